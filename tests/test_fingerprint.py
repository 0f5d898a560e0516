"""Fingerprint extraction: statistics against hand-computed values, determinism, round trip, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_dataset

from autoseg import parallel
from autoseg.cli import run
from autoseg.errors import DatasetError, UserError
from autoseg.fingerprint import ClassFacts, class_centroids, class_stats, extract_fingerprint, nonzero_box
from autoseg.io import Geometry, write_image, write_label
from autoseg.schema.fingerprint import Fingerprint
from autoseg.workdir import FINGERPRINT_FILE

SPACING = (3.0, 0.5, 0.8)  # z, y, x: anisotropic so a swapped axis shows in the mm values
SHAPE = (10, 20, 16)


def _write_case(root: Path, case_id: str, image: np.ndarray, label: np.ndarray) -> None:
    geom = Geometry(SPACING, (10.0, -5.0, 2.0), (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    write_image(image, geom, root / "imagesTr" / f"{case_id}_0000.nii.gz")
    write_label(label, geom, root / "labelsTr" / f"{case_id}.nii.gz")


def _write_dataset_json(root: Path, labels: dict, cases: int, channels=("CT",), **extra) -> None:
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
            "numTraining": cases, "file_ending": ".nii.gz", **extra}
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture
def constructed(tmp_path: Path) -> Path:
    """Two cases whose statistics are known by construction.

    a: nonzero region [2:9, 3:17, 1:15]; class 1 = two 2x4x4 cubes (64 voxels, 2 components, spanning
       z 3..8, y 4..14, x 2..12); class 2 = two voxels touching at a corner (1 component in 26-connectivity);
       foreground intensity 10.
    b: nonzero region [0:10, 0:20, 5:9]; class 1 = one 2x2x2 cube at [1:3, 2:4, 5:7]; no class 2;
       foreground intensity 30.
    """
    root = tmp_path / "Dataset009_Constructed"
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    image, label = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.uint8)
    image[2:9, 3:17, 1:15] = -5.0
    label[3:5, 4:8, 2:6] = 1
    label[6:8, 10:14, 8:12] = 1
    label[4, 10, 10] = label[5, 11, 11] = 2
    image[label > 0] = 10.0
    _write_case(root, "a", image, label)

    image, label = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.uint8)
    image[:, :, 5:9] = 1.0
    label[1:3, 2:4, 5:7] = 1
    image[label > 0] = 30.0
    _write_case(root, "b", image, label)
    _write_dataset_json(root, {"background": 0, "organ": 1, "dot": 2}, 2)
    return root


@pytest.fixture(scope="module")
def ct_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoseg.synth import generate

    return Path(generate("ct-aniso", tmp_path_factory.mktemp("synth") / "Dataset002_CT", size="tiny"))


def test_case_geometry_and_crop_box_match_construction(constructed: Path) -> None:
    a, b = extract_fingerprint(constructed, jobs=1).cases
    assert (a.id, b.id) == ("a", "b")
    assert a.spacing == pytest.approx(SPACING) and a.shape == list(SHAPE)  # NIfTI keeps float32
    assert a.crop_box == [[2, 9], [3, 17], [1, 15]] and a.cropped_shape == [7, 14, 14]
    assert b.crop_box == [[0, 10], [0, 20], [5, 9]] and b.cropped_shape == [10, 20, 4]


def test_class_counts_components_and_mm_extents_match_construction(constructed: Path) -> None:
    a, b = extract_fingerprint(constructed, jobs=1).cases
    assert a.class_voxels == {"1": 64, "2": 2} and b.class_voxels == {"1": 8}
    assert a.class_components == {"1": 2, "2": 1} and b.class_components == {"1": 1}
    assert a.class_extent_mm["1"] == pytest.approx([5 * 3.0, 10 * 0.5, 10 * 0.8])
    assert a.class_extent_mm["2"] == pytest.approx([2 * 3.0, 2 * 0.5, 2 * 0.8])
    assert b.class_extent_mm["1"] == pytest.approx([2 * 3.0, 2 * 0.5, 2 * 0.8])


def test_class_summary_counts_only_cases_where_present(constructed: Path) -> None:
    organ, dot = extract_fingerprint(constructed, jobs=1).classes
    assert (organ.value, organ.name, organ.cases_present) == (1, "organ", 2)
    assert (dot.value, dot.name, dot.cases_present) == (2, "dot", 1)
    voxel_mm3 = 3.0 * 0.5 * 0.8
    assert organ.volume_voxels == pytest.approx({"median": 36.0, "p5": 8 + 0.05 * 56, "p95": 8 + 0.95 * 56})
    assert organ.volume_mm3["median"] == pytest.approx(36.0 * voxel_mm3)
    assert organ.components_per_case == {"median": 1.5, "max": 2.0}
    assert organ.extent_mm["median"] == pytest.approx([10.5, 3.0, 4.8])
    assert dot.volume_voxels == {"median": 2.0, "p5": 2.0, "p95": 2.0}
    assert dot.extent_mm["p95"] == pytest.approx([6.0, 1.0, 1.6])


def test_channel_stats_pool_an_equal_sample_per_case(constructed: Path) -> None:
    (ct,) = extract_fingerprint(constructed, jobs=1).channels
    assert (ct.name, ct.modality) == ("CT", "CT")
    assert (ct.mean, ct.std, ct.median, ct.min, ct.max) == pytest.approx((20.0, 10.0, 20.0, 10.0, 30.0))
    assert (ct.percentile_00_5, ct.percentile_99_5) == pytest.approx((10.0, 30.0))


def test_dataset_summary(constructed: Path) -> None:
    fp = extract_fingerprint(constructed, jobs=1)
    assert fp.ndim == 3 and fp.dataset_name == "Dataset009_Constructed"
    assert fp.median_spacing == pytest.approx(SPACING) and fp.anisotropy_ratio == pytest.approx(6.0)
    assert fp.median_shape == list(SHAPE)
    assert fp.median_cropped_shape == [9, 17, 9]  # medians of (7, 10), (14, 20), (14, 4), half up
    assert fp.modalities == ["CT"]


def test_jobs_do_not_change_a_byte(ct_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "SMALL_BYTES", 0)  # a pool even for tiny data
    extract_fingerprint(ct_tiny, jobs=1).save(tmp_path / "j1.json")
    extract_fingerprint(ct_tiny, jobs=2).save(tmp_path / "j2.json")
    assert (tmp_path / "j1.json").read_bytes() == (tmp_path / "j2.json").read_bytes()


def test_absent_class_counts_cases_present(ct_tiny: Path) -> None:
    fp = extract_fingerprint(ct_tiny, jobs=1)
    liver, tumour = fp.classes
    with_tumour = sum("2" in c.class_voxels for c in fp.cases)
    assert liver.cases_present == len(fp.cases)
    assert 0 < tumour.cases_present == with_tumour < len(fp.cases)
    assert fp.anisotropy_ratio > 2.5  # 2.5-5 mm slices, < 1 mm in plane


def test_save_load_round_trip(ct_tiny: Path, tmp_path: Path) -> None:
    fp = extract_fingerprint(ct_tiny, jobs=1)
    fp.save(tmp_path / FINGERPRINT_FILE)
    back = Fingerprint.load(tmp_path / FINGERPRINT_FILE)
    assert back.to_dict() == fp.to_dict()
    assert back.cases == fp.cases and back.classes == fp.classes and back.channels == fp.channels


def test_source_and_dataset_hash_follow_content(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "Dataset003_Tiny")
    before = extract_fingerprint(root, jobs=1)
    write_tiny_dataset(root, seed=1)  # same files, new content
    after = extract_fingerprint(root, jobs=1)
    assert before.dataset_hash != after.dataset_hash
    assert before.cases[0].source_hash != after.cases[0].source_hash


def test_two_channels_and_png_2d(tmp_path: Path) -> None:
    from autoseg.synth import generate

    fp = extract_fingerprint(generate("mr-2ch", tmp_path / "mr", size="tiny"), jobs=1)
    assert [c.name for c in fp.channels] == ["T1", "T2"] and fp.channels[0].mean != fp.channels[1].mean
    fp2d = extract_fingerprint(generate("png-2d", tmp_path / "png", size="tiny"), jobs=2)
    assert fp2d.ndim == 2 and fp2d.median_spacing == [1.0, 1.0] and len(fp2d.cases[0].crop_box) == 2
    assert all(c.cases_present == len(fp2d.cases) for c in fp2d.classes)


def test_components_use_full_connectivity_in_2d_and_3d() -> None:
    diagonal2d = np.zeros((5, 5), np.uint8)
    diagonal2d[1, 1] = diagonal2d[2, 2] = 1
    diagonal2d[4, 0] = 1
    facts = class_stats(diagonal2d, (2.0, 1.0), None)
    assert facts.voxels == {"1": 3} and facts.components == {"1": 2} and facts.extents == {"1": [8.0, 3.0]}
    assert facts.centers == {"1": [0.6, 0.3]}  # rows 1-4 and columns 0-2 of 5: box centres 3.0 and 1.5
    assert facts.centroids == {"1": [0.5667, 0.3]}  # rows 1, 2, 4 and columns 1, 2, 0: (mean + 0.5) / 5
    corner3d = np.zeros((3, 3, 3), np.uint8)
    corner3d[0, 0, 0] = corner3d[1, 1, 1] = 1
    assert class_stats(corner3d, (1.0, 1.0, 1.0), None).components == {"1": 1}


def test_ignore_label_is_neither_a_class_nor_foreground(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "Dataset004_Ignore", cases=2,
                              labels={"background": 0, "organ": 1, "ignore": 2})
    fp = extract_fingerprint(root, jobs=1)
    assert [c.value for c in fp.classes] == [1]
    assert all(set(c.class_voxels) == {"1"} for c in fp.cases)
    facts = class_stats(np.array([[0, 1], [2, 2]], np.uint8), (1.0, 1.0), 2)
    assert facts.voxels == {"1": 1} and set(facts.centroids) == {"1"}


def test_region_dataset_summarises_integer_values(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "Dataset005_Regions", cases=2)  # label values 1 and 2
    _write_dataset_json(root, {"background": 0, "whole": [1, 2], "core": 2}, 2, channels=("MRI",),
                        regions_class_order=[1, 2])
    fp = extract_fingerprint(root, jobs=1)
    assert [(c.value, c.name) for c in fp.classes] == [(1, "label_1"), (2, "core")]


def test_nonzero_box_of_an_empty_image_is_the_whole_image() -> None:
    assert nonzero_box(np.zeros((1, 4, 5), np.float32)) == [[0, 4], [0, 5]]
    img = np.zeros((2, 4, 5, 6), np.float32)
    img[1, 1, 2, 3] = 1.0
    assert nonzero_box(img) == [[1, 2], [2, 3], [3, 4]]


def test_no_training_cases_is_a_dataset_error(tmp_path: Path) -> None:
    root = tmp_path / "Dataset006_Empty"
    root.mkdir()
    _write_dataset_json(root, {"background": 0, "organ": 1}, 0)
    with pytest.raises(DatasetError, match="no training cases"):
        extract_fingerprint(root)


def test_missing_label_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "SMALL_BYTES", 0)  # the error crosses the process pool
    root = write_tiny_dataset(tmp_path / "Dataset007_NoLabel", cases=2)
    (root / "labelsTr" / "case001.nii.gz").unlink()
    with pytest.raises(UserError, match="case001.nii.gz: file not found"):
        extract_fingerprint(root, jobs=2)


def test_cli_writes_fingerprint_to_workdir(tiny_dataset: Path, tmp_path: Path) -> None:
    assert run(["-q", "fingerprint", str(tiny_dataset), "-w", str(tmp_path / "work"), "-j", "1"]) == 0
    assert Fingerprint.load(tmp_path / "work" / FINGERPRINT_FILE).dataset_name == tiny_dataset.name


def test_cli_default_workdir_is_autoseg_work_dataset_name(tiny_dataset: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(["-q", "fingerprint", str(tiny_dataset), "-j", "1"]) == 0
    assert (tmp_path / "autoseg_work" / tiny_dataset.name / FINGERPRINT_FILE).is_file()


def test_cli_bad_dataset_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(["-q", "fingerprint", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_label_values_above_the_voxel_count_still_counted() -> None:
    label = np.array([[0, 200], [0, 200]], np.uint8)  # beyond cc3d.statistics' limit once cropped
    assert class_stats(label, (1.0, 2.0), None) == ClassFacts({"200": 2}, {"200": 1}, {"200": [2.0, 2.0]},
                                                              {"200": [0.5, 0.75]}, {"200": [0.5, 0.75]})


def test_centroids_are_shares_of_the_array_and_a_flip_mirrors_them() -> None:
    label = np.zeros((4, 10, 20), np.uint8)
    label[1:3, 2:4, 1:5] = 1
    label[0, 9, 19] = 3
    assert class_centroids(label) == {"1": [0.5, 0.3, 0.15], "3": [0.125, 0.95, 0.975]}
    flipped = class_centroids(label[:, :, ::-1])
    assert flipped["1"] == [0.5, 0.3, 0.85] and flipped["3"][2] == pytest.approx(0.025)
    assert class_centroids(label, ignore_label=3) == {"1": [0.5, 0.3, 0.15]}
    assert class_centroids(np.zeros((3, 3), np.uint8)) == {}


def test_a_class_labelled_by_its_side_is_found_sided_on_that_axis(tmp_path: Path) -> None:
    from autoseg.synth import generate

    fp = extract_fingerprint(generate("kidneys-lr", tmp_path / "k", size="tiny"), jobs=1)
    left, right = fp.classes
    assert left.center["p90"][2] < 0.45 and right.center["p10"][2] > 0.55
    assert 2 in left.sided_axes() and 2 in right.sided_axes() and 0 not in left.sided_axes()
    again = Fingerprint.from_dict(fp.to_dict())
    assert again.classes[0].sided_axes() == left.sided_axes()
    old = fp.to_dict()
    for c in old["classes"]:
        c.pop("center")  # a fingerprint written before centres were kept: nothing is sided
    assert Fingerprint.from_dict(old).classes[0].sided_axes() == []


def test_class_absent_from_every_case_is_summarised_with_zeros(constructed: Path) -> None:
    _write_dataset_json(constructed, {"background": 0, "organ": 1, "dot": 2, "never": 3}, 2)
    never = extract_fingerprint(constructed, jobs=1).classes[-1]
    assert (never.value, never.name, never.cases_present) == (3, "never", 0)
    assert never.volume_mm3 == {"median": 0.0, "p5": 0.0, "p95": 0.0}
    assert never.extent_mm == {"median": [0.0, 0.0, 0.0], "p95": [0.0, 0.0, 0.0]}
