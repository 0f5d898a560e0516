"""autoseg benchmark: suite parsing and its errors, cells with a fake command method, resume, failures, output."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from autoseg.benchmark import load_suite, run_benchmark
from autoseg.benchmark.measure import measure
from autoseg.cli import run
from autoseg.errors import UserError

REPO = Path(__file__).resolve().parent.parent
COPY_LABELS = "import shutil, sys; shutil.copytree(sys.argv[1] + '/labelsTs', sys.argv[2])"
"""A perfect 'method': it copies the reference labels as its predictions (Dice 1)."""


def write_suite(folder: Path, body: str, head: str = 'budget = "30s"') -> Path:
    path = folder / "suite.toml"
    path.write_text(f"[suite]\nname = \"t\"\n{head}\njobs = 1\n\n{body}")
    return path


TINY = '[datasets.ct]\nsynth = "ct-aniso"\nsize = "tiny"\ncases = 2\n'
PERFECT = (f'[methods.perfect]\nkind = "command"\n'
           f'command = "{{python}} -c \\"{COPY_LABELS}\\" {{dataset}} {{predictions}}"\n')
BROKEN = '[methods.broken]\nkind = "command"\ncommand = "{python} -c \\"raise SystemExit(\'no luck\')\\""\n'


# --- the suite file ---------------------------------------------------------------------------------------


def test_suite_parses_datasets_methods_and_budget(tmp_path):
    body = TINY + '[datasets.own]\npath = "data/X"\n[datasets.rad]\nreal = "pyradiomics"\n' + PERFECT + \
        '[methods.auto]\nkind = "autoseg"\nplanner = "resenc"\nsearch = true\nbudget = "5m"\nfolds = 3\n' \
        '[methods.ext]\nkind = "command"\ncommand = "run {predictions}"\nrequires = "missing/python"\n'
    s = load_suite(write_suite(tmp_path, body, 'budget = "2m"'))
    assert s.budget_s == 120 and s.jobs == 1 and s.device == "cpu"
    assert [d.name for d in s.datasets] == ["ct", "own", "rad"]
    assert s.datasets[0].synth == "ct-aniso" and s.datasets[0].cases == 2
    assert s.datasets[1].path == (tmp_path / "data/X").resolve()
    auto = s.methods[1]
    assert (auto.planner, auto.search, auto.folds, s.budget_of(auto)) == ("resenc", True, 3, 300)
    assert s.methods[2].requires == ((tmp_path / "missing/python").resolve(),)
    assert s.budget_of(s.methods[0]) == 120


@pytest.mark.parametrize("body, head, message", [
    ("", 'budget = "2m"', "datasets: missing"),
    (TINY + PERFECT, "", "suite.budget: missing"),
    (TINY + PERFECT, 'budget = "soon"', "suite.budget: budget 'soon'"),
    (TINY + PERFECT, 'budget = "2m"\nbudgett = 1', "suite.budgett: unknown key"),
    ('[datasets.x]\nsynth = "nope"\n' + PERFECT, 'budget = "2m"', "datasets.x.synth: unknown task 'nope'"),
    ('[datasets.x]\nsynth = "ct-aniso"\npath = "a"\n' + PERFECT, 'budget = "2m"', "datasets.x: give exactly one"),
    ('[datasets.x]\nreal = "mnist"\n' + PERFECT, 'budget = "2m"', "datasets.x.real: unknown real-data set"),
    (TINY + '[methods.m]\nkind = "magic"\n', 'budget = "2m"', "methods.m.kind: must be one of"),
    (TINY + '[methods.m]\nkind = "command"\n', 'budget = "2m"', "methods.m.command: missing"),
    (TINY + '[methods.m]\nkind = "command"\ncommand = "x {nope}"\n', 'budget = "2m"', "unknown placeholder {nope}"),
    (TINY + '[methods.m]\nkind = "autoseg"\nsearch = "yes"\n', 'budget = "2m"', "methods.m.search: must be true"),
    (TINY + '[methods.a__b]\nkind = "autoseg"\n', 'budget = "2m"', "methods.a__b: names may use"),
    ("[suite\n", None, "not valid TOML"),
])
def test_suite_errors_name_the_file_and_key(tmp_path, body, head, message):
    path = write_suite(tmp_path, body, head) if head is not None else tmp_path / "suite.toml"
    if head is None:
        path.write_text(body)
    with pytest.raises(UserError) as e:
        load_suite(path)
    assert str(e.value).startswith(str(path.resolve())) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_suite_file_is_one_line(tmp_path, capsys):
    assert run(["benchmark", str(tmp_path / "nope.toml"), "-o", str(tmp_path / "out")]) == 2
    assert "suite file not found" in capsys.readouterr().err


def test_default_and_smoke_suites_parse():
    for name in ("default", "smoke", "regions"):
        s = load_suite(REPO / "benchmarks" / "suites" / f"{name}.toml")
        assert s.datasets and s.methods
        assert {m.kind for m in s.methods} == {"autoseg", "command"}


def test_the_regions_suites_plain_labels_planner_trains_the_region_values_as_exclusive_classes(tmp_path, monkeypatch):
    """regions.toml's autoseg-labels: brats-like planned with its regions dropped (softmax over background and
    the values 1-3, Dice + CE); the suite still scores it on the regions (dataset.json). Step times are the
    FLOPs model's (test_plan.fake_measure), not measured."""
    from test_plan import fake_measure

    from autoseg.plan import compute
    from autoseg.schema.plans import Plans
    from autoseg.synth import generate

    monkeypatch.setattr(compute, "measure_step", fake_measure())
    ds = generate("brats-like", tmp_path / "ds", size="tiny", cases=2, seed=0)
    planner = REPO / "benchmarks" / "suites" / "labels_planner.py"
    assert run(["-q", "plan", str(ds), "-w", str(tmp_path / "w"), "--planner", str(planner), "--budget", "1m",
                "--device", "cpu", "-j", "1", "--folds", "2"]) == 0
    plans = Plans.load(tmp_path / "w" / "plans.json")
    assert plans.labels == {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}
    assert not plans.regions and not plans.regions_class_order and plans.num_classes == 4
    assert {c.loss.name for c in plans.configurations.values()} == {"dice_ce"}


# --- cells ------------------------------------------------------------------------------------------------


def test_command_cell_is_evaluated_resumed_and_failures_recorded(tmp_path):
    suite = write_suite(tmp_path, TINY + PERFECT + BROKEN +
                        '[methods.absent]\nkind = "command"\ncommand = "x"\nrequires = "no/such/python"\n')
    out = tmp_path / "out"
    records = run_benchmark(suite, out, progress=False)
    by = {r["method"]: r for r in records}
    assert by["perfect"]["status"] == "done"
    assert by["perfect"]["metrics"]["foreground"]["dice"] == pytest.approx(1.0)
    assert set(by["perfect"]["metrics"]["per_class"]) == {"liver", "tumour"}
    assert {"run", "evaluate"} <= set(by["perfect"]["stages"])
    assert by["perfect"]["stages"]["run"]["peak_pss_mb"] > 0
    assert by["broken"]["status"] == "failed" and "no luck" in by["broken"]["reason"]
    assert Path(by["broken"]["log_dir"]).is_dir()
    assert by["absent"]["status"] == "skipped" and "no/such/python" in by["absent"]["reason"]
    cell = out / "cells" / "ct__perfect.json"
    assert json.loads(cell.read_text())["status"] == "done"

    # leaderboard files
    md = (out / "leaderboard.md").read_text()
    assert "| ct |" in md and "1.000" in md and "no luck" in md and "## Machine" in md
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    fg = next(r for r in rows if r["method"] == "perfect" and r["class"] == "foreground_mean")
    assert float(fg["dice"]) == 1.0
    assert (out / "leaderboard.png").stat().st_size > 1000

    # resume: the finished cell is not run again; the failed one is
    stamp = cell.stat().st_mtime_ns
    again = {r["method"]: r for r in run_benchmark(suite, out, progress=False)}
    assert cell.stat().st_mtime_ns == stamp and again["perfect"]["started"] == by["perfect"]["started"]
    assert again["broken"]["status"] == "failed"

    # a changed budget is a different cell
    run_benchmark(suite, out, budget="45s", methods=["perfect"], progress=False)
    assert cell.stat().st_mtime_ns != stamp


def test_a_dataset_that_cannot_be_prepared_fails_its_cells_only(tmp_path):
    suite = write_suite(tmp_path, TINY + '[datasets.gone]\npath = "nowhere"\n' + PERFECT)
    records = run_benchmark(suite, tmp_path / "out", progress=False)
    assert [r["status"] for r in records] == ["done", "failed"]
    assert "no dataset.json" in records[1]["reason"]


def test_cli_filters_and_reports(tmp_path, capsys):
    suite = write_suite(tmp_path, TINY + PERFECT + BROKEN)
    assert run(["benchmark", str(suite), "-o", str(tmp_path / "o"), "--methods", "perfect"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] ct / perfect" in err and "foreground Dice 1.000" in err
    assert run(["benchmark", str(suite), "-o", str(tmp_path / "o"), "--methods", "nope"]) == 2


def test_measure_kills_a_command_past_its_timeout(tmp_path):
    m = measure([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert m.returncode == -9 and m.wall_s < 10


@pytest.mark.slow
def test_smoke_suite_runs_autoseg_end_to_end(tmp_path):
    records = run_benchmark(REPO / "benchmarks" / "suites" / "smoke.toml", tmp_path / "out",
                            methods=["autoseg"], progress=False)
    assert all(r["status"] == "done" for r in records), [r.get("reason") for r in records]
    assert {"plan", "train", "predict", "evaluate"} <= set(records[0]["stages"])


def test_a_lesion_class_is_also_scored_on_the_cases_that_hold_it_and_its_onset_is_tabled():
    from autoseg.benchmark.cells import summarize_metrics
    from autoseg.benchmark.leaderboard import _onset_lines

    def case(dice: float, ref_mm3: float) -> dict:
        return {"classes": {"lesion": {"dice": dice, "volume_ref_mm3": ref_mm3}}}

    stats = {"dice": {"mean": 0.25}, "nsd": {"mean": 0.2}, "hd95_mm": {"mean": None}}
    result = {"summary": {"per_class": {"lesion": stats}, "foreground_mean": {"dice": 0.25}, "cases": 3},
              "cases": {"a": case(0.5, 10.0), "b": case(0.0, 0.0), "c": case(0.3, 5.0)}}
    lesion = summarize_metrics(result)["per_class"]["lesion"]
    assert lesion["dice_present"] == pytest.approx(0.4) and lesion["cases_present"] == 2
    by = {("d", "m"): {"onsets": {"lesion": {"step": 300, "seconds": 42.0, "share": 0.25},
                                  "organ": {"step": None, "seconds": None, "share": None}}}}
    assert "| m | 300 / 42s / 25% | - |" in _onset_lines("d", ["m"], by)


def test_lesion_classes_are_scored_lesion_by_lesion_and_added_to_finished_cells_from_their_predictions(tmp_path):
    """ct-aniso's tumour is a small class in the fingerprint: the leaderboard gets its lesion-wise Dice and F1;
    a cell finished before lesion-wise metrics existed gets them from its stored predictions, not a re-run."""
    suite = write_suite(tmp_path, TINY + PERFECT)
    out = tmp_path / "out"
    (record,) = run_benchmark(suite, out, progress=False)
    lesions = record["metrics"]["lesions"]
    assert set(lesions) == {"tumour"}
    assert lesions["tumour"]["lesion_dice"] == 1.0 and lesions["tumour"]["f1"] == 1.0
    md = (out / "leaderboard.md").read_text()
    assert "lesion-wise Dice (BraTS)" in md and "| perfect | tumour |" in md
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert next(r for r in rows if r["class"] == "tumour")["lesion_dice"] == "1.0"

    cell = out / "cells" / "ct__perfect.json"
    old = json.loads(cell.read_text())
    del old["metrics"]["lesions"]
    cell.write_text(json.dumps(old))
    (again,) = run_benchmark(suite, out, progress=False)
    assert again["started"] == record["started"] and again["metrics"]["lesions"]["tumour"]["f1"] == 1.0
