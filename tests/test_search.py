"""The search (autoseg plan --search): its space around the rules' point, the rules' point first, memory
rejection, resuming, two workers on one journal file, and what it writes."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

import optuna
import pytest
import torch
from conftest import write_tiny_dataset
from optuna.trial import TrialState

from autoseg.checkpoint import load_checkpoint
from autoseg.cli import run
from autoseg.errors import UserError
from autoseg.fingerprint import extract_fingerprint
from autoseg.nets import build_network
from autoseg.plan import rules as rule_toolbox
from autoseg.preprocess import preprocess
from autoseg.schema.plans import Configuration, Measurement, Network, Plans, Schedule
from autoseg.search import SearchBudget, divide_budget, run_search
from autoseg.search import study as studies
from autoseg.search.space import (
    SearchSpace,
    derive_space,
    neighbours,
    parse_patch,
    rule_params,
    to_configuration,
)
from autoseg.search.trial import TrialRunner
from autoseg.train import Trainer
from autoseg.workdir import FINAL, LATEST, PLANS_FILE, SEARCH_DIR
from autoseg.workflow import warm_start

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_rules(fp) -> Plans:
    spacing = rule_toolbox.target_spacing(fp)
    net = Network("unet", [4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [1, 1, 1], decoder_convs=1)
    cfg = Configuration(name="3d_fullres", ndim=3, spacing=spacing, median_shape=fp.median_cropped_shape,
                        patch_size=[16, 16, 16], batch_size=2, normalization=rule_toolbox.normalization(fp),
                        resampling=rule_toolbox.resampling(spacing), network=net,
                        schedule=Schedule(steps=4, val_every=2),
                        measured=Measurement(step_time_s=0.02, peak_memory_mb=8.0, parameters=10_000))
    return Plans(fp.dataset_name, fp.dataset_hash, "test", {"type": "cpu"}, 60.0, {"3d_fullres": cfg},
                 axis_order=[0, 1, 2], channel_names=fp.channel_names, labels=fp.labels,
                 file_ending=fp.file_ending, folds=2,
                 train_runs=[{"configuration": "3d_fullres", "fold": 0, "seconds": 60.0}])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    ds = write_tiny_dataset(root / "Dataset001_Tiny", cases=4, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    fp = extract_fingerprint(ds, jobs=1)
    work = root / "work"
    plans = tiny_rules(fp)
    plans.save(work / PLANS_FILE)
    preprocess(ds, work, plans, fp, jobs=1)
    return work


@pytest.fixture
def work(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "work"))


def fake_measure(cfg: Configuration) -> tuple[float, float]:
    """Memory grows with patch voxels x batch x width, as the real measurement does."""
    voxels = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    return 0.01, 8.0 * 2 ** 20 * voxels / 16 ** 3 * cfg.batch_size / 2 * cfg.network.features[0] / 4


def fake_evaluate(cfg: Configuration, trial: optuna.Trial) -> float:
    """Deterministic and cheap: smaller learning rates and the Dice loss score higher."""
    return 0.5 + 0.1 * (cfg.loss.name == "dice") - cfg.optimizer.lr


def budget(trials: int) -> SearchBudget:
    return SearchBudget(total_s=100.0, search_s=40.0, train_s=60.0, trials=trials, trial_s=5.0)


# --- the space --------------------------------------------------------------------------------------------


def test_space_holds_the_rules_point_and_its_parameters_give_the_rules_configuration_back(base):
    rules = Plans.load(base / PLANS_FILE).configurations["3d_fullres"]
    space = derive_space(rules, memory_bytes=1 << 30)
    params = rule_params(space, rules)
    assert space.patches[0] == "16x16x16" and params["patch"] == "16x16x16"
    assert params["family"] in space.families and params["loss"] in space.losses
    assert params["batch"] in space.batches and space.lr[0] < params["lr"] < space.lr[1]
    assert to_configuration(space, rules, params) == rules


def test_every_family_depth_and_width_makes_a_valid_network_of_the_patch(base):
    rules = Plans.load(base / PLANS_FILE).configurations["3d_fullres"]
    space = derive_space(rules, memory_bytes=1 << 30)
    point = rule_params(space, rules)
    seen = set()
    for family in space.families:
        for depth in space.depths:
            cfg = to_configuration(space, rules, {**point, "family": family, "depth": depth, "width": 2.0})
            seen.add((family, cfg.network.n_stages))
            assert cfg.network.features[0] == 8 and cfg.network.family == family
            out = build_network(cfg.network, 1, 3, 3).train()(torch.zeros(1, 1, *cfg.patch_size))
            out = out[0] if isinstance(out, list) else out
            assert list(out.shape) == [1, 3, *cfg.patch_size]
    assert {n for _, n in seen} == {2, 3, 4}  # depth -1, 0, +1 around the rules' 3 stages


def test_patch_candidates_that_would_not_fit_the_memory_are_left_out(base):
    rules = Plans.load(base / PLANS_FILE).configurations["3d_fullres"]
    rules = replace(rules, median_shape=[64, 64, 64])
    roomy = derive_space(rules, memory_bytes=1 << 30).patches
    tight = derive_space(rules, memory_bytes=int(8.5 * 2 ** 20)).patches  # the rules' 8 MiB and a bit
    assert len(roomy) > len(tight) and tight[0] == "16x16x16"
    assert all(parse_patch(p)[0] <= 16 for p in tight)


def test_budget_is_divided_between_search_and_training_and_said():
    split = divide_budget(20 * 60, trials=8)
    assert split.search_s + split.train_s == pytest.approx(20 * 60)
    assert split.describe().startswith("budget 20m: search 8m (8 trials")
    assert "final training 12m" in split.describe()


# --- the study ------------------------------------------------------------------------------------------


def test_rules_point_runs_first_and_a_real_tiny_search_writes_plans_table_and_plots(base, work):
    rules = Plans.load(work / PLANS_FILE).configurations["3d_fullres"]
    found = run_search(work, budget(3), dataset=base.parent / "Dataset001_Tiny", trial_steps=2, workers=0,
                       progress=False, device="cpu")
    study = optuna.load_study(study_name=found.study, storage=studies.default_storage(work))
    first = study.trials[0]
    assert first.user_attrs["rules"] and first.state == TrialState.COMPLETE
    assert 0.0 <= first.value <= 1.0 and first.params["patch"] == "16x16x16" and first.params["depth"] == 0
    assert len(study.trials) == 3
    plans = Plans.load(work / PLANS_FILE)
    s = plans.search
    assert s["status"] == "done" and s["rules_trial"] == 0 and s["best_value"] >= s["rules_value"]
    assert s["rules"] == asdict(rules)  # the rules' point kept beside the chosen one
    best = study.trials[s["best_trial"]]
    assert plans.configurations["3d_fullres"].network.family == best.params["family"]
    assert plans.configurations["3d_fullres"].schedule.steps >= 1
    rows = list(csv.DictReader(open(work / SEARCH_DIR / "trials.csv")))
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and rows[0]["rules"] == "True"
    assert (work / SEARCH_DIR / "history.png").stat().st_size > 1000
    assert not (work / "runs").exists()  # trials train in search/, not runs/
    assert (work / SEARCH_DIR / "trial_0000" / "log.csv").is_file()
    # only the best trial's weights are kept, for the final training of fold 0 to start from
    kept = sorted(p.parent.name for p in (work / SEARCH_DIR).glob("trial_*/checkpoint_*.pt"))
    assert kept == [f"trial_{best.number:04d}"]
    assert s["warm_start"] == {"configuration": "3d_fullres", "fold": 0, "trial": best.number,
                               "checkpoint": f"search/trial_{best.number:04d}/checkpoint_final.pt"}
    assert warm_start(work, plans, "3d_fullres", 0) == work / s["warm_start"]["checkpoint"]
    assert warm_start(work, plans, "3d_fullres", 1) is None  # another fold never saw these weights' training
    assert warm_start(work, plans, "3d_fullres", 0, splits_file=work / "splits.json") is None


def test_a_run_starts_from_given_weights_and_refuses_weights_of_another_network(work):
    first = Trainer(work, "3d_fullres", 0, steps=2, workers=0, progress=False, folder=work / "first").fit()
    start = load_checkpoint(first.folder / FINAL)["model"]
    Trainer(work, "3d_fullres", 0, steps=4, workers=0, progress=False, folder=work / "warm",
            init_weights=first.folder / FINAL, stop_after=0).fit()
    ck = load_checkpoint(work / "warm" / LATEST)
    assert ck["step"] == 0 and ck["state"]["init_weights"] == str(first.folder / FINAL)
    assert all(torch.equal(ck["model"][k], v) for k, v in start.items())
    plans = Plans.load(work / PLANS_FILE)
    cfg = plans.configurations["3d_fullres"]
    plans.configurations["3d_fullres"] = replace(cfg, network=replace(cfg.network, features=[8, 16, 32]))
    with pytest.raises(UserError, match="its weights do not fit configuration '3d_fullres'"):
        Trainer(work, "3d_fullres", 0, plans=plans, steps=4, workers=0, progress=False, folder=work / "other",
                init_weights=first.folder / FINAL).fit()


def test_candidate_over_the_memory_limit_is_rejected_before_it_trains(work):
    plans = Plans.load(work / PLANS_FILE)
    rules = plans.configurations["3d_fullres"]
    space = derive_space(rules, memory_bytes=1 << 30)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(rule_params(space, rules), user_attrs={"rules": True})
    study.enqueue_trial({**rule_params(space, rules), "width": 2.0, "batch": 4})  # 4x the rules' memory
    trained = []

    def evaluate(cfg, trial):
        trained.append(trial.number)
        return 0.5

    runner = TrialRunner(work, None, plans, rules, space, {"trial_s": 1.0}, memory_limit=16 * 2 ** 20,
                         measure=fake_measure, evaluate=evaluate)
    studies.run_trials(study, runner, 2, deadline=None)
    ok, big = study.trials
    assert ok.state == TrialState.COMPLETE and trained == [0]
    assert big.state == TrialState.PRUNED and big.user_attrs["rejected"].startswith("memory 32 MiB > 16 MiB")
    assert not (work / SEARCH_DIR / "trial_0001").exists()


def test_running_the_same_search_again_resumes_the_study(work):
    first = run_search(work, budget(2), trial_steps=2, progress=False, evaluate=fake_evaluate, measure=fake_measure)
    again = run_search(work, budget(4), trial_steps=2, progress=False, evaluate=fake_evaluate, measure=fake_measure)
    assert again.study == first.study and first.ran == 2 and again.ran == 2
    study = optuna.load_study(study_name=again.study, storage=studies.default_storage(work))
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert sum(bool(t.user_attrs.get("rules")) for t in study.trials) == 1  # enqueued once
    assert Plans.load(work / PLANS_FILE).search["trials"]["complete"] == 4


def test_single_changes_to_the_rules_point_run_next_once_each(work):
    """With few trials, moves one value at a time from the rules' point come before TPE's draws, each
    labelled in the trial table; resuming the study does not queue them again."""
    first = run_search(work, budget(5), trial_steps=2, progress=False, evaluate=fake_evaluate, measure=fake_measure)
    study = optuna.load_study(study_name=first.study, storage=studies.default_storage(work))
    rules = study.trials[0].params
    assert [t.user_attrs.get("neighbour") for t in study.trials[:3]] == [None, "width x0.5", "augmentation x0.5"]
    for t in study.trials[1:3]:
        changed = [k for k in rules if t.params[k] != rules[k]]
        assert len(changed) == 1, changed
    assert study.trials[1].params["width"] == rules["width"] / 2
    rows = list(csv.DictReader(open(work / SEARCH_DIR / "trials.csv")))
    assert rows[1]["note"].startswith("single change: width x0.5")
    run_search(work, budget(7), trial_steps=2, progress=False, evaluate=fake_evaluate, measure=fake_measure)
    study = optuna.load_study(study_name=first.study, storage=studies.default_storage(work))
    assert sum("neighbour" in t.user_attrs for t in study.trials) == 2


def test_neighbours_change_one_value_each_and_stay_in_the_space(base):
    cfg = Plans.load(base / PLANS_FILE).configurations["3d_fullres"]
    space = derive_space(cfg, memory_bytes=8 << 30)
    rules = rule_params(space, cfg)
    moves = neighbours(space, rules)
    assert [label for label, _ in moves][:2] == ["width x0.5", "augmentation x0.5"]
    for label, params in moves:
        assert sum(params[k] != rules[k] for k in rules) == 1, label
        to_configuration(space, cfg, params)  # a valid configuration


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from autoseg.search import search_worker

    work, journal, flags = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def evaluate(cfg, trial):
        (flags / str(trial.number)).touch()
        t = time.time()
        while len(list(flags.iterdir())) < 2 and time.time() - t < 60:  # both workers are in a trial
            time.sleep(0.05)
        return 0.5 - cfg.optimizer.lr

    search_worker(work, storage=journal, trials=6, progress=False, evaluate=evaluate,
                  measure=lambda cfg: (0.01, 2.0 ** 20))
""")


def test_two_workers_share_one_study_on_a_journal_file(work, tmp_path):
    journal = str(tmp_path / "study.journal")
    run_search(work, budget(1), storage=journal, trial_steps=2, progress=False, evaluate=fake_evaluate,
               measure=fake_measure)
    flags = tmp_path / "flags"
    flags.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(work), journal, str(flags)],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=240) == 0, p.stderr.read()
    storage = studies.open_storage(journal, work)
    name = Plans.load(work / PLANS_FILE).search["study"]
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in trials[1:]}) == 2  # both workers ran trials
    assert Plans.load(work / PLANS_FILE).search["trials"]["complete"] == 6


def test_validation_hook_sees_each_validation_and_can_end_the_run(work):
    seen = []

    class Stop(Exception):
        pass

    def hook(step, dice):
        seen.append(step)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        Trainer(work, "3d_fullres", 0, steps=8, workers=0, progress=False, folder=work / "elsewhere",
                on_validation=hook).fit()
    assert seen == [2, 4]
    assert (work / "elsewhere" / "log.csv").is_file() and not (work / "runs").exists()


def test_a_timed_run_validating_at_its_fifth_step_adapts_without_dividing_by_zero(work):
    plans = Plans.load(work / PLANS_FILE)
    cfg = plans.configurations["3d_fullres"]
    plans.configurations["3d_fullres"] = replace(cfg, schedule=replace(cfg.schedule, val_every=5))
    seen = []
    Trainer(work, "3d_fullres", 0, plans=plans, seconds=0.2, workers=0, progress=False, folder=work / "short",
            on_validation=lambda step, dice: seen.append(step)).fit()
    assert seen[0] == 5  # the speed is re-derived at step 5, right after the warm-up, and the run goes on


def test_a_timed_run_validating_every_step_ends_when_its_budget_is_spent(work):
    """Re-deriving the total at every step must not add 'one more step' for ever once the budget is gone."""
    plans = Plans.load(work / PLANS_FILE)
    cfg = plans.configurations["3d_fullres"]
    plans.configurations["3d_fullres"] = replace(cfg, schedule=replace(cfg.schedule, val_every=1))
    result = Trainer(work, "3d_fullres", 0, plans=plans, seconds=0.5, workers=0, progress=False,
                     folder=work / "every").fit()
    assert result.finished and result.steps < 100


# --- the command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials 0: must be at least 1"),
    (["--storage", "notes.txt"], "expected a database URL"),
    (["--storage", "/no/such/folder/s.journal"], "does not exist"),
    (["--storage", "nosuchdb://host/x"], "cannot open the study storage"),
])
def test_bad_search_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    code = run(["plan", str(tmp_path / "missing"), "-w", str(tmp_path / "w"), "--search", "--budget", "1m",
                "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_trials_without_search_and_a_worker_without_a_study_are_errors(work, tmp_path, capsys):
    assert run(["plan", str(tmp_path / "missing"), "--trials", "3"]) == 2
    assert "need --search" in capsys.readouterr().err
    assert run(["search-worker", str(work)]) == 2
    assert "no search study" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_search_then_train_from_the_command_line(tmp_path, capsys):
    ds = write_tiny_dataset(tmp_path / "Dataset002_Cli", cases=4, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    w = tmp_path / "w"
    assert run(["plan", str(ds), "-w", str(w), "--search", "--trials", "3", "--budget", "90s", "--device", "cpu",
                "--folds", "2", "-j", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "search: budget 90s: search 36s (3 trials" in out and "search: chose trial" in out
    plans = json.loads((w / PLANS_FILE).read_text())
    assert plans["search"]["rules"]["name"] == "3d_fullres"
    capsys.readouterr()
    assert run(["train", str(ds), "-w", str(w), "--steps", "2", "-q"]) == 0
    checkpoint = w / plans["search"]["warm_start"]["checkpoint"]
    assert f"3d_fullres fold 0: starting from the weights in {checkpoint}" in capsys.readouterr().err


def test_rules_with_time_to_spare_try_a_wider_network_first(base):
    """Rules that stopped at their largest network with steps to spare (vessels tiny at 20 minutes: 2886
    steps where 488 would do) are likelier to gain from width x2 than from width x0.5."""
    from dataclasses import replace

    from autoseg.search.space import has_time_to_spare

    cfg = Plans.load(base / PLANS_FILE).configurations["3d_fullres"]
    space = derive_space(cfg, memory_bytes=8 << 30)
    rules = rule_params(space, cfg)
    busy = replace(cfg, schedule=replace(cfg.schedule, steps=300), measured=replace(cfg.measured, step_time_s=1.0))
    idle = replace(cfg, schedule=replace(cfg.schedule, steps=3000), measured=replace(cfg.measured, step_time_s=0.35))
    assert not has_time_to_spare(busy) and has_time_to_spare(idle)
    assert neighbours(space, rules, wider_first=True)[0][0] == "width x2"
    assert neighbours(space, rules)[0][0] == "width x0.5"


def test_a_class_on_one_side_tries_training_without_mirroring_first(base):
    """A class labelled by its side (kidneys-lr: left and right kidney, alike) is shown under the other's label
    by mirroring along that axis: the single change that turns mirroring off comes first, and its
    configuration mirrors neither in training nor at test time."""
    from dataclasses import replace

    from autoseg.schema.fingerprint import ClassStats
    from autoseg.search.space import mirror_hides_side

    cfg = Plans.load(base / PLANS_FILE).configurations["3d_fullres"]
    cfg = replace(cfg, augmentation=replace(cfg.augmentation, mirror_axes=[0, 1, 2]))
    space = derive_space(cfg, memory_bytes=8 << 30)
    rules = rule_params(space, cfg)
    assert space.mirror == [True, False] and rules["mirror"] is True

    def stats(p10: list[float], p90: list[float]) -> ClassStats:
        return ClassStats(1, "left", 5, {}, {}, {}, {}, center={"p10": p10, "p90": p90})

    left = stats([0.4, 0.4, 0.2], [0.6, 0.6, 0.3])  # x below the middle in 9 of 10 cases
    centred = stats([0.4, 0.4, 0.4], [0.6, 0.6, 0.6])
    assert left.sided_axes() == [2] and centred.sided_axes() == []
    assert mirror_hides_side([left], [0, 1, 2], cfg) and not mirror_hides_side([centred], [0, 1, 2], cfg)
    assert not mirror_hides_side([left], [2, 0, 1], replace(cfg, augmentation=replace(cfg.augmentation,
                                                                                         mirror_axes=[1, 2])))
    assert mirror_hides_side([left], [0, 1, 2], replace(cfg, ndim=2, augmentation=replace(
        cfg.augmentation, mirror_axes=[1])))  # a 2d configuration of 3D data: its axis 1 is the data's x

    moves = neighbours(space, rules, mirror_first=True)
    assert moves[0][0] == "no mirroring" and "no mirroring" not in [m for m, _ in neighbours(space, rules)]
    unmirrored = to_configuration(space, cfg, moves[0][1])
    assert unmirrored.augmentation.mirror_axes == [] and to_configuration(space, cfg, rules) == cfg
    old = space.to_dict()
    old.pop("mirror")  # a study stored before mirroring was searched: its space stays as it was
    assert SearchSpace.from_dict(old).mirror == [True]
