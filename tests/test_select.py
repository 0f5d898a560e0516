"""Selection from out-of-fold outputs: greedy ensembles on probabilities built so the answer is known,
selection.json round trip, the CLI, and ``autoseg predict`` applying the tuned rules.

The workdirs are written by hand (plans.json, runs/<config>/fold_<k>/validation/) so no training is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.cli import run
from autoseg.io import Geometry, read_label, write_image, write_label
from autoseg.postprocess import apply_postprocessing
from autoseg.schema.plans import Configuration, Network, Normalization, Plans, Resampling
from autoseg.select import select_model, selection_table
from autoseg.workdir import SELECTION_FILE, Workdir
from autoseg.workflow import select_after_training

SHAPE = (6, 8, 8)
GEOM = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel().tolist()))
LABELS = {"background": 0, "organ": 1}


def _reference(i: int) -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:5, 2 + i % 2:6, 1:7] = 1
    return ref


def write_dataset(root: Path, cases: int = 4) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        write_image(np.zeros(SHAPE, np.float32), GEOM, root / "imagesTr" / f"case{i}_0000.nii.gz")
        write_label(_reference(i), GEOM, root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": LABELS,
                                                   "numTraining": cases, "file_ending": ".nii.gz"}))
    return root


def write_plans(work: Path, names: list[str]) -> Plans:
    k, s = [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]]
    configs = {n: Configuration(name=n, ndim=3, spacing=[2.0, 1.0, 1.0], median_shape=list(SHAPE),
                                patch_size=[4, 8, 8], batch_size=2, normalization=[Normalization()],
                                resampling=Resampling(), network=Network("unet", [4, 8], k, s, [1, 1], 1))
               for n in names}
    plans = Plans("Tiny", "hash", "test", {"type": "cpu"}, 60.0, configs, axis_order=[0, 1, 2],
                  channel_names=["MRI"], labels=LABELS, file_ending=".nii.gz", folds=2,
                  train_runs=[{"configuration": n, "fold": 0, "seconds": 1.0} for n in names])
    plans.save(work / "plans.json")
    return plans


def write_oof(work: Path, name: str, fold: int, probs: dict[str, np.ndarray]) -> None:
    """One fold's validation outputs: foreground probability maps -> npz, argmax label map, summary.json."""
    folder = work / "runs" / name / f"fold_{fold}" / "validation"
    folder.mkdir(parents=True)
    for cid, p1 in probs.items():
        p = np.stack([1 - p1, p1]).astype(np.float16)
        np.savez_compressed(folder / f"{cid}.npz", probabilities=p)
        write_label(p.argmax(0).astype(np.uint8), GEOM, folder / f"{cid}.nii.gz")
    (folder / "summary.json").write_text(json.dumps({"cases": {c: {} for c in probs}}))


def complementary(i: int, half: int) -> np.ndarray:
    """Confident (0.9) on one half of the organ, hesitant-wrong (0.45) on the other: two of these with
    opposite halves are each half right, and their mean is right everywhere."""
    ref = _reference(i).astype(np.float32)
    p = ref * 0.9
    p[:, :, 4:] = np.where(ref[:, :, 4:] > 0, 0.45, 0.0) if half == 0 else p[:, :, 4:]
    p[:, :, :4] = np.where(ref[:, :, :4] > 0, 0.45, 0.0) if half == 1 else p[:, :, :4]
    return p


@pytest.fixture
def three_configs(tmp_path: Path) -> tuple[Path, Path]:
    """``a`` and ``b`` complement each other (and tie: the plan's order puts ``a`` first); ``bad`` is confidently
    wrong everywhere and has fold 0 only."""
    ds = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    work.mkdir()
    write_plans(work, ["a", "b", "bad"])
    folds = {0: ["case0", "case1"], 1: ["case2", "case3"]}
    for k, ids in folds.items():
        write_oof(work, "a", k, {c: complementary(int(c[-1]), 0) for c in ids})
        write_oof(work, "b", k, {c: complementary(int(c[-1]), 1) for c in ids})
    write_oof(work, "bad", 0, {c: 1.0 - _reference(int(c[-1])) for c in folds[0]})
    return ds, work


def test_greedy_adds_the_complementary_configuration_and_rejects_the_bad_one(three_configs):
    ds, work = three_configs
    sel = select_model(work, ds, postprocessing=False)
    assert sel.ensemble == ["a", "b"] and sel.configuration == "a"
    assert sel.cv["a+b"]["foreground_mean_dice"] == pytest.approx(1.0)
    assert sel.cv["a"]["foreground_mean_dice"] < 0.8 and sel.cv["b"]["foreground_mean_dice"] < 0.8
    first, second = sel.greedy[1], sel.greedy[2]
    assert first["added"] == "b" and first["candidates"]["bad"]["after"] < first["candidates"]["bad"]["before"]
    assert first["candidates"]["bad"]["cases"] == 2  # compared on the cases all members cover: bad has fold 0 only
    assert second["added"] is None and not second["candidates"]["bad"]["acceptable"]
    assert sel.cv["a"]["cases"] == 4 and sel.cv["a"]["folds"] == [0, 1] and sel.cv["a+bad"]["folds"] == [0]
    assert "a+b" in selection_table(sel) and "<- chosen" in selection_table(sel)


def test_one_configuration_with_one_fold_is_selected_without_ensembling(tmp_path):
    ds = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    work.mkdir()
    write_plans(work, ["only"])
    write_oof(work, "only", 0, {"case1": _reference(1).astype(np.float32)})
    sel = select_model(work, ds)
    assert sel.configuration == "only" and sel.ensemble == ["only"] and list(sel.cv) == ["only"]
    assert sel.cv["only"]["cases"] == 1 and sel.cv["only"]["mean_dice"]["organ"] == 1.0
    assert sel.postprocessing == []  # nothing to improve on a perfect prediction


def test_dataset_json_segment_codes_go_into_the_selection(tmp_path):
    ds = write_dataset(tmp_path / "Dataset001_Tiny")
    raw = json.loads((ds / "dataset.json").read_text())
    organ = {"category": "SCT:123037004:Anatomical Structure", "type": "SCT:10200004:Liver"}
    (ds / "dataset.json").write_text(json.dumps({**raw, "segment_codes": {"organ": organ}}))
    work = tmp_path / "work"
    work.mkdir()
    write_plans(work, ["only"])
    write_oof(work, "only", 0, {"case1": _reference(1).astype(np.float32)})
    assert select_model(work, ds, postprocessing=False).segment_codes == {"organ": organ}
    assert json.loads((work / SELECTION_FILE).read_text())["segment_codes"] == {"organ": organ}


def test_selection_json_round_trips_and_predict_reads_it(three_configs):
    ds, work = three_configs
    sel = select_model(work, ds)
    on_disk = json.loads((work / SELECTION_FILE).read_text())
    assert on_disk == sel.to_dict()
    plans = Plans.load(work / "plans.json")
    assert Workdir(work).model(plans)[0] == "a" and Workdir(work).model(plans) == ["a", "b"]
    loaded = Workdir(work).load_selection()
    assert loaded == sel and loaded.rules_for(["a", "b"]) == on_disk["postprocessing"]
    assert on_disk["postprocessing_tuning"]["model"] == ["a", "b"]  # tuned on the model predict runs
    assert set(on_disk["postprocessing_by_model"]) == {"a+b", "a"}
    assert loaded.rules_for(["a"]) == on_disk["configuration_postprocessing_tuning"]["rules"]
    assert loaded.rules_for(["b"]) == []  # rules tuned for another model are not applied


def test_postprocessing_is_tuned_on_the_selected_model(tmp_path):
    """A false-positive speck in every case of the only configuration: the tuner removes it."""
    ds = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    work.mkdir()
    write_plans(work, ["c"])
    probs = {}
    for i in range(4):
        p = _reference(i).astype(np.float32)
        p[5, 7, i] = 1.0  # a speck apart from the organ
        probs[f"case{i}"] = p
    write_oof(work, "c", 0, probs)
    sel = select_model(work, ds)
    assert {"rule": "largest_component", "classes": [1]} in sel.postprocessing
    tuning = sel.postprocessing_tuning
    assert tuning["foreground_mean_dice_after"] == 1.0 > tuning["foreground_mean_dice_before"]


def test_a_class_the_network_is_unsure_of_gets_a_weight(tmp_path):
    """The organ found at p 0.3 in every case (a plain argmax loses it all): the selection puts a class weight in
    front of the rules and the table says so (``autoseg predict`` applying it: tests/test_inference.py)."""
    ds = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    work.mkdir()
    write_plans(work, ["c"])
    write_oof(work, "c", 0, {f"case{i}": _reference(i).astype(np.float32) * 0.3 for i in range(4)})
    sel = select_model(work, ds)
    rule = sel.postprocessing[0]
    assert rule["rule"] == "class_weights" and rule["classes"] == [1] and rule["factors"][0] >= 3.0
    assert sel.postprocessing_tuning["foreground_mean_dice_before"] == 0.0
    assert sel.postprocessing_tuning["foreground_mean_dice_after"] == 1.0
    assert "kept                   class_weights organ x" in selection_table(sel)


def test_cli_select_prints_the_table(three_configs, capsys):
    ds, work = three_configs
    assert run(["select", str(ds), "-w", str(work)]) == 0
    out = capsys.readouterr().out
    assert "predict uses the ensemble a+b" in out and (work / SELECTION_FILE).is_file()


def test_selection_after_training_reports_instead_of_failing(tmp_path, capsys):
    ds = write_dataset(tmp_path / "Dataset001_Tiny")
    work = tmp_path / "work"
    work.mkdir()
    write_plans(work, ["c"])
    selection, error = select_after_training(Workdir(work), ds)
    assert selection is None and "no out-of-fold predictions" in error
    with pytest.raises(Exception, match="no out-of-fold predictions"):
        run(["select", str(ds), "-w", str(work), "--debug"])


def test_predict_applies_the_rules_of_selection_json(tmp_path):
    """End to end through ``autoseg.predict.predict`` with random-init folds: the written labels are the raw
    prediction with the rules applied (here: remove every foreground component below a huge size)."""
    from autoseg.checkpoint import save_checkpoint
    from autoseg.inference import Predictor
    from autoseg.nets import build_network
    from autoseg.predict import predict
    from autoseg.workdir import FINAL, Workdir

    work = tmp_path / "work"
    work.mkdir()
    plans = write_plans(work, ["c"])
    cfg = plans.configurations["c"]
    torch.manual_seed(0)
    net = build_network(cfg.network, 1, plans.num_classes, 3)
    Workdir(work).run("c", 0).folder.mkdir(parents=True)
    save_checkpoint(Workdir(work).run("c", 0).folder / FINAL, net, torch.optim.SGD(net.parameters(), lr=0.1), None, 1, {})
    image = np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    write_image(image, GEOM, tmp_path / "in" / "x_0000.nii.gz")

    raw = Predictor.from_workdir(work, mirror="off").predict_case(image[None], GEOM)[0]
    rules = [{"rule": "remove_small", "classes": [1], "min_voxels": SHAPE[0] * SHAPE[1] * SHAPE[2] + 1}]
    (work / SELECTION_FILE).write_text(json.dumps({"configuration": "c", "postprocessing": rules}))
    predict(work, tmp_path / "in", tmp_path / "out", mirror="off", progress=False)
    written, _ = read_label(tmp_path / "out" / "x.nii.gz")
    assert raw.any() and not written.any()
    assert np.array_equal(written, apply_postprocessing(raw, rules, GEOM.spacing))
    assert Predictor.from_workdir(work, configuration="c").postprocessing == rules


# --- instance datasets: the configuration whose instances predict makes, by out-of-fold panoptic quality -------


def instance_workdir(root: Path) -> tuple[Path, Path]:
    """Touching-nuclei cells (tests/test_instances.py) and three configurations with perfect label maps:
    ``merged`` (first in the plan) gives each class's components, so touching nuclei merge; ``split`` gives
    the reference instances; ``old`` was validated before instance maps were kept (no instances/)."""
    from test_instances import write_instance_dataset

    from autoseg.instances import instances_from_labels
    from autoseg.schema.plans import Instances

    ds = write_instance_dataset(root / "Dataset905_Cells", cases=4)
    work = root / "work"
    work.mkdir()
    net = Network("unet", [4, 8], [[3, 3], [3, 3]], [[1, 1], [2, 2]], [1, 1], decoder_convs=1)
    methods = {"merged": "components", "split": "watershed", "old": "components"}
    configs = {n: Configuration(name=n, ndim=2, spacing=[1.0, 1.0], median_shape=[32, 32], patch_size=[16, 16],
                                batch_size=2, normalization=[Normalization()], resampling=Resampling(),
                                network=Network(**{**net.__dict__, "instance_outputs": int(m == "watershed")}),
                                instances=Instances(method=m))
               for n, m in methods.items()}
    labels = {"background": 0, "nucleus": 1, "small": 2}
    Plans("Cells", "hash", "test", {"type": "cpu"}, 60.0, configs, axis_order=[0, 1], channel_names=["microscopy"],
          labels=labels, file_ending=".png", folds=2, instance_classes=["nucleus", "small"],
          train_runs=[{"configuration": n, "fold": 0, "seconds": 1.0} for n in methods]).save(work / "plans.json")
    geom = Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    for name in methods:
        for fold, ids in {0: ["cell00", "cell01"], 1: ["cell02", "cell03"]}.items():
            folder = work / "runs" / name / f"fold_{fold}" / "validation"
            folder.mkdir(parents=True)
            for cid in ids:
                label, _ = read_label(ds / "labelsTr" / f"{cid}.png")
                np.savez_compressed(folder / f"{cid}.npz", probabilities=np.eye(3, dtype=np.float16)[label].transpose(2, 0, 1))
                write_label(label, geom, folder / f"{cid}.png")
                if name != "old":
                    inst = (read_label(ds / "instancesTr" / f"{cid}.png")[0] if name == "split"
                            else instances_from_labels(label, [1, 2]))
                    write_label(inst, geom, folder / "instances" / f"{cid}.png", ids=True)
            (folder / "summary.json").write_text(json.dumps({"cases": {c: {} for c in ids}}))
    return ds, work


def test_instances_come_from_the_configuration_with_the_higher_out_of_fold_pq(tmp_path):
    ds, work = instance_workdir(tmp_path)
    sel = select_model(work, ds, postprocessing=False)
    assert sel.configuration == "merged"  # the semantic model: by Dice, all three tie, the plan's first wins
    choice = sel.instances
    assert choice.configuration == "split" and choice.methods == {"merged": "components", "split": "watershed"}
    assert choice.pq["split"] == pytest.approx(1.0) and choice.f1["split"] == pytest.approx(1.0)
    assert choice.pq["merged"] < 0.75 and choice.f1["merged"] < 0.75  # each touching pair is one object there
    assert choice.cases == 4
    assert Workdir(work).load_selection() == sel  # selection.json round-trips the new key
    assert json.loads((work / SELECTION_FILE).read_text())["instances"]["configuration"] == "split"
    table = selection_table(sel)
    assert "<- instances" in table and "predict makes the instances with split (watershed)" in table


def test_runs_validated_without_instance_maps_are_skipped_with_a_note(tmp_path):
    ds, work = instance_workdir(tmp_path)
    sel = select_model(work, ds, postprocessing=False)
    assert "old" not in sel.instances.pq and "old" in sel.cv  # compared by Dice, not by PQ
    assert sel.instances.skipped == ["old: fold(s) 0, 1 validated without out-of-fold instance maps (an older run): "
                                     "left out"]
    assert "skipped old: fold(s) 0, 1" in selection_table(sel)
    import shutil

    for name in ("merged", "split"):  # every run older: no instance choice, predict's model makes its own
        for fold in (0, 1):
            shutil.rmtree(work / "runs" / name / f"fold_{fold}" / "validation" / "instances")
    sel = select_model(work, ds, postprocessing=False)
    assert sel.instances.configuration is None and len(sel.instances.skipped) == 3
    assert "no configuration has out-of-fold instance maps" in selection_table(sel)


def test_a_dataset_without_instance_classes_has_no_instance_choice(three_configs):
    ds, work = three_configs
    sel = select_model(work, ds, postprocessing=False)
    assert sel.instances is None and "instances" not in json.loads((work / SELECTION_FILE).read_text())
