"""Instances: the fingerprint's instance statistics, the cached instance maps, the loader's instance patches,
the touching-object split, the per-case table and predict's instance outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.instances import (
    components,
    contact_zone,
    instance_stats,
    instances_from_labels,
    interior_map,
    split_touching,
    touching_ids,
)
from autoseg.io import Geometry, write_image, write_label


def disk(shape, centre, radius) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def touching_pair(shape=(32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Two disks of radius 6 whose centres are 11 apart (they overlap a little: one blob of class 1), and a
    lone disk of class 2; the label map and the true instance map."""
    inst = np.zeros(shape, np.int32)
    inst[disk(shape, (10, 8), 6)] = 1
    inst[disk(shape, (10, 19), 6) & (inst == 0)] = 2
    inst[disk(shape, (25, 24), 4)] = 3
    label = np.where(inst == 3, 2, (inst > 0).astype(np.int32))
    return label.astype(np.uint8), inst


def write_instance_dataset(root: Path, cases: int = 4, shape=(32, 32), seed: int = 0,
                           instance_files: bool = True) -> Path:
    """A 2D PNG dataset of touching nuclei-like disks: class 1 in touching pairs, class 2 alone; instancesTr
    and ``instance_classes`` (without ``instance_files`` the instances are the components)."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", *(["instancesTr"] if instance_files else [])):
        (root / sub).mkdir(parents=True, exist_ok=True)
    geom = Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    for i in range(cases + 1):
        inst = np.zeros(shape, np.int32)
        label = np.zeros(shape, np.uint8)
        n = 0
        for row in (8, 23):
            c = int(rng.integers(6, 9))
            for dx in (0, 10):
                n += 1
                m = disk(shape, (row + int(rng.integers(-1, 2)), c + dx), 5) & (inst == 0)
                inst[m], label[m] = n, 1
        n += 1
        m = disk(shape, (int(rng.integers(14, 18)), 27), 3) & (inst == 0)
        inst[m], label[m] = n, 2
        image = 40 + 150 * (label > 0) + 30 * (label == 2) + rng.normal(0, 8, shape)
        image[interior_map(inst) < 0.25] -= 60 * (label[interior_map(inst) < 0.25] > 0)  # darker rims
        image = np.clip(image, 0, 255).astype(np.uint8)
        split = "Tr" if i < cases else "Ts"
        write_image(image, geom, root / f"images{split}" / f"cell{i:02d}_0000.png")
        if split == "Tr":
            write_label(label, geom, root / "labelsTr" / f"cell{i:02d}.png")
            if instance_files:
                write_label(inst, geom, root / "instancesTr" / f"cell{i:02d}.png")
    meta = {"name": root.name, "channel_names": {"0": "microscopy"},
            "labels": {"background": 0, "nucleus": 1, "small": 2}, "numTraining": cases, "file_ending": ".png",
            "instance_classes": ["nucleus", "small"]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


# --- building blocks -----------------------------------------------------------------------------------


def test_components_of_a_class_become_instances_numbered_across_classes():
    label, _ = touching_pair()
    inst = instances_from_labels(label, [1, 2])
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2]  # the touching pair is one component
    assert set(np.unique(label[inst == 2]).tolist()) == {2}


def test_touching_instances_are_found_and_a_lone_one_is_not():
    _, inst = touching_pair()
    assert touching_ids(inst).tolist() == [1, 2]
    diagonal = np.zeros((4, 4), np.int32)
    diagonal[0, 0], diagonal[1, 1], diagonal[3, 3] = 1, 2, 3
    assert touching_ids(diagonal).tolist() == [1, 2]  # full connectivity: diagonal neighbours touch
    stats = instance_stats(inst, np.where(inst == 3, 2, inst > 0).astype(np.uint8), [1, 2])
    assert stats[1].touching == 2 and len(stats[1].sizes) == 2
    assert stats[2].touching == 0 and stats[2].sizes == [int((inst == 3).sum())]


def test_interior_map_is_one_at_each_centre_and_has_a_valley_between_touching_objects():
    _, inst = touching_pair()
    interior = interior_map(inst)
    assert interior[10, 8] == pytest.approx(1.0) and interior[10, 19] > 0.95  # (disk 2 lost a cap to disk 1)
    assert interior[inst == 0].max() == 0.0
    assert interior[10, 13] < 0.35  # the seam between the two disks


def test_watershed_splits_hand_made_touching_disks_that_components_merge():
    label, inst = touching_pair()
    assert components(label == 1)[1] == 1
    parted = split_touching(label, interior_map(inst), [1, 2])
    assert len(np.unique(parted)) - 1 == 3
    for true_id in (1, 2, 3):  # each true disk is (almost) exactly one predicted instance
        ids, counts = np.unique(parted[inst == true_id], return_counts=True)
        assert counts.max() / counts.sum() > 0.95 and ids[counts.argmax()] > 0
    assert np.array_equal(parted > 0, label > 0)  # the semantic mask is kept


def test_the_contact_zone_lies_where_two_objects_meet_and_a_lone_object_has_none():
    _, inst = touching_pair()
    zone = contact_zone(inst, radius=2)
    assert zone[10, 13] and zone[10, 14]  # the seam between disks 1 and 2
    assert not zone[10, 8] and not zone[10, 19]  # their centres, far from the seam
    assert not zone[inst == 3].any()  # the lone disk meets nothing
    assert zone.sum() < 0.25 * (inst > 0).sum()  # a band along the seam, not the objects


def test_the_seed_dice_and_the_contact_weights_change_the_interior_loss_where_they_should():
    import torch

    from autoseg.losses import InteriorLoss, seed_dice_loss

    seeds = torch.zeros(1, 8, 8, dtype=torch.bool)
    seeds[0, 2:5, 2:5] = True
    assert seed_dice_loss(torch.where(seeds, 20.0, -20.0), seeds).item() < 1e-4
    assert seed_dice_loss(torch.where(seeds, -20.0, 20.0), seeds).item() > 0.99

    class Fixed(torch.nn.Module):  # the segmentation part: nothing to learn here
        def forward(self, logits, target):
            return logits.sum() * 0

    interior = torch.zeros(1, 8, 8)
    interior[0, 2:5, 2:5] = 0.8
    logits = torch.zeros(1, 3, 8, 8)
    logits[0, 2, 0, 0] = 5.0  # one confident mistake, outside every object
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    plain = InteriorLoss(Fixed(), 2)(logits, target, interior)
    assert InteriorLoss(Fixed(), 2)(logits, target, interior, torch.ones(1, 8, 8)).item() == pytest.approx(plain.item())
    heavy = torch.ones(1, 8, 8)
    heavy[0, 0, 0] = 11.0  # the mistake lies in a contact zone
    assert InteriorLoss(Fixed(), 2)(logits, target, interior, heavy).item() > plain.item()
    with_seeds = InteriorLoss(Fixed(), 2, seed_dice=True)(logits, target, interior)
    assert with_seeds.item() > plain.item() + 0.5  # no seed predicted: its Dice term is near 1


def test_the_rules_train_touching_objects_with_the_seed_dice_and_contact_weights(tmp_path):
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.plan import rules

    fp = extract_fingerprint(write_instance_dataset(tmp_path / "Dataset905_Cells", cases=3), jobs=1)
    chosen, note = rules.instances(fp)
    assert chosen.method == "watershed" and chosen.seed_dice and chosen.contact_weight == rules.CONTACT_WEIGHT
    assert "contact zones" in note


def test_watershed_without_seeds_keeps_each_component_as_one_instance():
    label, _ = touching_pair()
    parted = split_touching(label, np.zeros(label.shape, np.float32), [1, 2])
    assert np.array_equal(parted, instances_from_labels(label, [1, 2]))


# --- fingerprint, preprocessing and loader ---------------------------------------------------------------


def test_fingerprint_records_instance_counts_sizes_and_touching(tmp_path):
    from autoseg.fingerprint import extract_fingerprint

    ds = write_instance_dataset(tmp_path / "Dataset900_Cells", cases=3)
    fp = extract_fingerprint(ds, jobs=1)
    assert fp.instance_classes == ["nucleus", "small"]
    nucleus, small = fp.classes
    assert nucleus.instances["per_case"]["median"] == 4
    assert nucleus.instances["touching_share"] == 1.0  # every nucleus touches its neighbour
    assert small.instances["touching_share"] == 0.0 and small.instances["voxels"]["median"] > 10
    assert fp.touching_share() == 1.0
    # without instance files the instances are the components: the touching pairs merge, nothing touches
    plain = write_instance_dataset(tmp_path / "Dataset901_Cells", cases=3, instance_files=False)
    fp2 = extract_fingerprint(plain, jobs=1)
    assert fp2.classes[0].instances["per_case"]["median"] == 2 and fp2.touching_share() == 0.0


def test_datasets_without_instances_have_no_instance_statistics(tiny_dataset):
    from autoseg.fingerprint import extract_fingerprint

    fp = extract_fingerprint(tiny_dataset, jobs=1)
    assert fp.instance_classes == [] and all(c.instances == {} for c in fp.classes)
    assert all(c.instance_voxels == {} for c in fp.cases) and fp.touching_share() == 0.0


def hand_plans(fp, patch=(16, 16), mirror_axes=(0, 1)):
    from autoseg.plan import rules
    from autoseg.schema.plans import Augmentation, Configuration, Network, Plans

    spacing = [0.5, 0.5]  # half the image spacing: the instance map is resampled (nearest) with the label
    net = Network("unet", [4, 8], [[3, 3], [3, 3]], [[1, 1], [2, 2]], [1, 1], decoder_convs=1)
    cfg = Configuration(name="2d", ndim=2, spacing=spacing, median_shape=[64, 64], patch_size=list(patch),
                        batch_size=2, normalization=rules.normalization(fp), resampling=rules.resampling(spacing),
                        network=net, augmentation=Augmentation(mirror_axes=list(mirror_axes)))
    return Plans(fp.dataset_name, fp.dataset_hash, "test", {"type": "cpu"}, 60.0, {"2d": cfg},
                 axis_order=[0, 1], channel_names=fp.channel_names, labels=fp.labels, file_ending=fp.file_ending,
                 folds=2, train_runs=[{"configuration": "2d", "fold": 0, "seconds": 1.0}])


def test_preprocessing_caches_the_instance_map_and_the_loader_cuts_it_with_the_label(tmp_path):
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.loader import BatchMaker
    from autoseg.preprocess import preprocess
    from autoseg.workdir import Workdir, instance_path

    ds = write_instance_dataset(tmp_path / "Dataset902_Cells", cases=2)
    fp = extract_fingerprint(ds, jobs=1)
    plans = hand_plans(fp)
    work = tmp_path / "work"
    assert preprocess(ds, work, plans, fp, jobs=1) == {"2d": 2}
    folder = Workdir(work).preprocessed("2d")
    seg = np.load(folder / "cell00_seg.npy")
    inst = np.load(instance_path(folder, "cell00"))
    assert inst.dtype == np.int32 and inst.shape == seg.shape == (1, 64, 64)
    assert np.array_equal(inst > 0, seg > 0)  # same crop, same nearest resampling as the label
    assert len(np.unique(inst)) - 1 == 5
    assert preprocess(ds, work, plans, fp, jobs=1) == {"2d": 0}  # current, instance map included
    instance_path(folder, "cell01").unlink()
    assert preprocess(ds, work, plans, fp, jobs=1) == {"2d": 1}  # a missing instance map recomputes the case

    cfg = plans.configurations["2d"]
    maker = BatchMaker(folder, ["cell00", "cell01"], cfg, seed=0)
    for step in range(6):
        batch = maker.make(step)
        assert batch["instances"].shape == batch["target"].shape == (2, 16, 16)
        assert np.array_equal(batch["instances"] > 0, batch["target"] > 0)  # same spatial transform
        for b in range(2):  # each instance keeps one class
            for i in np.unique(batch["instances"][b])[1:]:
                assert len(np.unique(batch["target"][b][batch["instances"][b] == i])) == 1

    from dataclasses import replace

    from autoseg.schema.plans import Instances

    weighted = replace(cfg, instances=Instances(method="watershed", contact_weight=10.0))
    batch = BatchMaker(folder, ["cell00", "cell01"], weighted, seed=0).make(0)
    assert batch["interior"].shape == batch["interior_weight"].shape == (2, 16, 16)
    assert set(np.unique(batch["interior_weight"])) <= {1.0, 11.0}
    assert np.array_equal(batch["interior_weight"] > 1, np.stack([contact_zone(i) for i in batch["instances"]]))


def test_datasets_without_instances_cache_and_load_exactly_as_before(tiny_dataset, tmp_path):
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.loader import BatchMaker
    from autoseg.plan import rules
    from autoseg.preprocess import config_hash, preprocess
    from autoseg.schema.plans import Configuration, Network, Plans
    from autoseg.workdir import Workdir

    fp = extract_fingerprint(tiny_dataset, jobs=1)
    net = Network("unet", [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], decoder_convs=1)
    cfg = Configuration(name="3d_fullres", ndim=3, spacing=[2.0, 1.0, 1.0], median_shape=[8, 8, 8],
                        patch_size=[8, 8, 8], batch_size=2, normalization=rules.normalization(fp),
                        resampling=rules.resampling([2.0, 1.0, 1.0]), network=net)
    plans = Plans(fp.dataset_name, fp.dataset_hash, "test", {}, 60.0, {"3d_fullres": cfg}, axis_order=[0, 1, 2],
                  channel_names=fp.channel_names, labels=fp.labels, file_ending=fp.file_ending)
    preprocess(tiny_dataset, tmp_path / "work", plans, fp, jobs=1)
    folder = Workdir(tmp_path / "work").preprocessed("3d_fullres")
    assert not list(folder.glob("*_inst.npy"))
    assert config_hash(cfg, plans, None, (1,)) != config_hash(cfg, plans, None)  # instances enter only when there
    batch = BatchMaker(folder, ["case000", "case001"], cfg, seed=0).make(0)
    assert set(batch) == {"data", "target"} and batch["target"].dtype == np.int16


# --- training and prediction -------------------------------------------------------------------------------


def trained_workdir(root: Path, method: str, steps: int = 12) -> tuple[Path, Path]:
    """The cell dataset, a hand plan with ``method``, preprocessed, fold 0 trained for ``steps`` steps."""
    from dataclasses import replace

    from autoseg.fingerprint import extract_fingerprint
    from autoseg.preprocess import preprocess
    from autoseg.schema.plans import Instances, Schedule
    from autoseg.train import Trainer
    from autoseg.workdir import Workdir

    ds = write_instance_dataset(root / "Dataset904_Cells", cases=4)
    fp = extract_fingerprint(ds, jobs=1)
    plans = hand_plans(fp)
    cfg = plans.configurations["2d"]
    plans.configurations["2d"] = replace(
        cfg, spacing=[1.0, 1.0], schedule=Schedule(steps=steps, val_every=steps),
        instances=Instances(method=method, contact_weight=10.0, seed_dice=True) if method == "watershed"
        else Instances(method=method),
        network=replace(cfg.network, instance_outputs=int(method == "watershed")))
    if method == "components":  # a plan without instance classes: instances only when asked for
        plans.instance_classes = []
    else:
        plans.instance_classes = list(fp.instance_classes)
    work = Workdir(root / "work")
    work.save_plans(plans)
    work.save_fingerprint(fp)
    preprocess(ds, work.root, plans, fp, jobs=1)
    Trainer(work.root, "2d", 0, steps=steps, workers=0, device="cpu", progress=False).fit()
    return ds, work.root


def test_the_interior_output_trains_and_predict_returns_labels_instances_and_their_table(tmp_path):
    from autoseg.inference import Predictor
    from autoseg.io import read_images

    ds, work = trained_workdir(tmp_path, "watershed")
    predictor = Predictor.from_workdir(work, folds=[0], device="cpu", mirror="off")
    assert predictor.instances  # the plan has instance classes: on by default
    images, geometry = read_images([ds / "imagesTs" / "cell04_0000.png"])
    result = predictor.predict(images, geometry, case_id="cell04")
    assert result.labels.shape == result.instances.shape == images.shape[1:]
    assert result.instances.dtype == np.int32
    assert np.array_equal(result.instances > 0, np.isin(result.labels, [1, 2]))  # every object voxel has an id
    assert [r.instance for r in result.table] == np.unique(result.instances)[1:].tolist()
    seg, _ = predictor.predict_case(images, geometry)  # the semantic path is unchanged
    assert np.array_equal(seg, result.labels)

    from autoseg.bundle import load_bundle, pack_bundle

    bundle = load_bundle(pack_bundle(work, tmp_path / "cells.autoseg", configuration="2d"))
    labels, geom, objects = bundle.predict(images, geometry, device="cpu", mirror="off")
    assert np.array_equal(labels, result.labels) and np.array_equal(objects, result.instances)


def test_instances_on_request_for_a_model_without_instance_classes_are_components(tmp_path):
    from autoseg.inference import Predictor
    from autoseg.io import read_images

    ds, work = trained_workdir(tmp_path, "components")
    plain = Predictor.from_workdir(work, folds=[0], device="cpu", mirror="off")
    assert not plain.instances
    plain.predict_files(ds / "imagesTs", tmp_path / "plain")  # a semantic model writes what it always wrote
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["cell04.png"]
    predictor = Predictor.from_workdir(work, folds=[0], device="cpu", mirror="off", instances=True)
    images, geometry = read_images([ds / "imagesTs" / "cell04_0000.png"])
    result = predictor.predict(images, geometry)
    assert np.array_equal(result.instances, instances_from_labels(result.labels, [1, 2]))
    out = tmp_path / "pred"
    summary = predictor.predict_files(ds / "imagesTs", out)
    assert summary.cases == 1 and (out / "instances" / "cell04.png").is_file()
    assert (out / "instances.csv").read_text().splitlines()[0] == (
        "case,instance,class,voxels,volume_mm3,centroid_x,centroid_y,centroid_z,bbox,mean_probability")


def test_out_of_fold_instance_maps_are_written_and_equal_a_fold_alone_predict(tmp_path):
    """The held-out cases' instance maps in validation/instances/ are what ``autoseg predict`` of that fold
    alone (no mirroring, no selection) makes of the raw image; summary.json is still written last, after the
    same claim checks; the selection then scores them."""
    from autoseg.inference import Predictor
    from autoseg.io import read_images, read_label
    from autoseg.oof import predict_fold_validation
    from autoseg.select import select_model
    from autoseg.workdir import Workdir

    ds, work = trained_workdir(tmp_path, "watershed")
    plans = Workdir(work).load_plans()
    checks = []
    predict_fold_validation(work, ds, plans, "2d", 0, ["cell01", "cell03"], device="cpu",
                            before_write=lambda: checks.append(1))
    assert len(checks) == 3  # one per case, one before the summary
    run = Workdir(work).run("2d", 0)
    predictor = Predictor.from_workdir(work, "2d", folds=[0], device="cpu", mirror="off")
    for cid in ("cell01", "cell03"):
        images, geometry = read_images([ds / "imagesTr" / f"{cid}_0000.png"])
        result = predictor.predict(images, geometry, case_id=cid)
        assert result.instances.max() > 1  # objects found: not two empty maps
        oof, _ = read_label(run.oof_instances(cid, ".png"))
        assert np.array_equal(oof, result.instances) and np.array_equal(read_label(run.oof_labels(cid, ".png"))[0],
                                                                         result.labels)
        assert run.validation_summary.stat().st_mtime_ns >= run.oof_instances(cid, ".png").stat().st_mtime_ns
    sel = select_model(work, ds, postprocessing=False)
    assert sel.instances.configuration == "2d" and sel.instances.methods == {"2d": "watershed"}
    assert sel.instances.cases == 2 and sel.instances.pq["2d"] is not None


def test_predict_makes_the_instances_with_the_configuration_selection_json_chose(tmp_path):
    """The semantic model is selection.json's ``cc`` (components; random-init fold); its instances come from
    ``2d``'s interior + watershed (``instances.configuration``), run beside it: the label map is ``cc``'s alone,
    the instance map ``2d``'s interior split over it. The bundle carries ``2d`` and predicts the same."""
    from dataclasses import replace

    import torch

    from autoseg.bundle import load_bundle, pack_bundle
    from autoseg.checkpoint import save_checkpoint
    from autoseg.inference import Predictor
    from autoseg.io import read_images
    from autoseg.nets import build_network
    from autoseg.schema.plans import Instances
    from autoseg.workdir import SELECTION_FILE, Workdir

    ds, work = trained_workdir(tmp_path, "watershed")
    w = Workdir(work)
    plans = w.load_plans()
    cfg = plans.configurations["2d"]
    plans.configurations["cc"] = replace(cfg, name="cc", instances=Instances(method="components"),
                                         network=replace(cfg.network, instance_outputs=0))
    w.save_plans(plans)
    torch.manual_seed(0)
    net = build_network(plans.configurations["cc"].network, 1, plans.num_classes, 2)
    w.run("cc", 0).folder.mkdir(parents=True)
    save_checkpoint(w.run("cc", 0).final, net, torch.optim.SGD(net.parameters(), lr=0.1), None, 1, {})
    choice = {"configuration": "2d", "pq": {"cc": 0.2, "2d": 0.6}, "f1": {"cc": 0.3, "2d": 0.7}, "cases": 4,
              "methods": {"cc": "components", "2d": "watershed"}}
    (work / SELECTION_FILE).write_text(json.dumps({"configuration": "cc", "instances": choice}))

    images, geometry = read_images([ds / "imagesTs" / "cell04_0000.png"])
    predictor = Predictor.from_workdir(work, folds=[0], device="cpu", mirror="off")
    assert predictor.name == "cc" and predictor.instances_from == "2d"
    assert "instances from 2d (watershed)" in predictor.describe()
    result = predictor.predict(images, geometry)
    alone = Predictor.from_workdir(work, "cc", folds=[0], device="cpu", mirror="off")  # --config: its own
    assert alone.instances_from is None
    own = alone.predict(images, geometry)
    assert np.array_equal(result.labels, own.labels)
    assert np.array_equal(own.instances, instances_from_labels(own.labels, [1, 2]))
    watershed = Predictor.from_workdir(work, "2d", folds=[0], device="cpu", mirror="off")
    prep = watershed._run(watershed._preprocess(images, geometry, "image"), geometry)
    from autoseg.ensemble import combine_interior

    interior = combine_interior(prep.outputs)
    threshold = cfg.instances.threshold
    assert np.array_equal(result.instances, split_touching(result.labels, interior, [1, 2], threshold))

    bundle = load_bundle(pack_bundle(work, tmp_path / "cells.autoseg"))
    assert bundle.manifest["instances_from"] == "2d" and set(bundle.weights) == {"cc", "2d"}
    labels, _, objects = bundle.predict(images, geometry, device="cpu", mirror="off")
    assert np.array_equal(labels, result.labels) and np.array_equal(objects, result.instances)
    assert "instances: made by `2d` (watershed)" in bundle.card


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_train_predict_on_touching_nuclei_writes_instance_maps_in_the_input_geometry(tmp_path, capsys):
    """From the CLI: the plan chooses the touching-object formulation (every training nucleus touches one),
    a few dozen steps train it, and predict writes the label map, the instance map (the input's size and
    geometry) and instances.csv."""
    import csv

    import SimpleITK as sitk

    from autoseg.cli import run as main
    from autoseg.schema.plans import Plans

    ds = write_instance_dataset(tmp_path / "Dataset903_Cells", cases=4)
    work, out = tmp_path / "work", tmp_path / "pred"
    assert main(["-q", "plan", str(ds), "-w", str(work), "-j", "1", "--budget", "1m", "--device", "cpu"]) == 0
    plans = Plans.load(work / "plans.json")
    cfg = plans.configurations["2d"]
    assert plans.instance_classes == ["nucleus", "small"]
    assert cfg.instances.method == "watershed" and cfg.network.instance_outputs == 1
    assert any(note.startswith("instances: 100% of the training instances touch") for note in plans.notes)
    assert main(["-q", "train", str(ds), "-w", str(work), "--fold", "0", "--steps", "30", "--workers", "0",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["-q", "predict", str(work), str(ds / "imagesTs"), str(out), "--device", "cpu"]) == 0
    assert "instance(s) in" in capsys.readouterr().out
    image = sitk.ReadImage(str(ds / "imagesTs" / "cell04_0000.png"))
    inst = sitk.ReadImage(str(out / "instances" / "cell04.png"))
    assert inst.GetSize() == image.GetSize() and inst.GetSpacing() == image.GetSpacing()
    assert (out / "cell04.png").is_file()
    rows = list(csv.DictReader((out / "instances.csv").open()))
    ids = np.unique(sitk.GetArrayFromImage(inst))[1:]
    assert [int(r["instance"]) for r in rows] == ids.tolist()
    assert {r["class"] for r in rows} <= {"nucleus", "small"}
    for r in rows:
        assert int(r["voxels"]) == int((sitk.GetArrayFromImage(inst) == int(r["instance"])).sum())
        assert 0.0 <= float(r["mean_probability"]) <= 1.0 and float(r["volume_mm3"]) == int(r["voxels"])


def test_instance_maps_of_more_than_255_objects_are_written_to_png_in_16_bits(tmp_path):
    from autoseg.errors import UserError
    from autoseg.io import read_label, write_label

    ids = np.arange(600, dtype=np.int32).reshape(20, 30)
    geom = Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    write_label(ids, geom, tmp_path / "inst.png", ids=True)
    back, _ = read_label(tmp_path / "inst.png")
    assert np.array_equal(back, ids)
    with pytest.raises(UserError, match="labels above 255"):  # a semantic label map stays 8-bit
        write_label(ids, geom, tmp_path / "seg.png")
