"""convert_msd: MSD task folders (4D NIfTI, channels last) become nnU-Net v2 datasets autoseg can load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.dataset import load_dataset
from autoseg.errors import UserError
from autoseg.io import read_image, read_label
from autoseg.msd import convert_msd

SHAPE = (6, 7, 8)  # numpy (z, y, x)
SPACING = (0.75, 1.25, 2.5)  # SimpleITK (x, y, z); float32-exact, as NIfTI stores it
ORIGIN = (-10.5, 20.25, 3.0)
DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # axes permuted and flipped


def _volume(array: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def _write_4d(channels: list[np.ndarray], path: Path) -> None:
    """A 4D NIfTI with channels last, as the MSD ships multi-modal cases."""
    sitk.WriteImage(sitk.JoinSeries([_volume(c) for c in channels]), str(path))


def make_msd_task(root: Path, *, channels: int = 2, cases: int = 3, tests: int = 1, seed: int = 0) -> Path:
    """A tiny MSD task: int16 images (4D when ``channels`` > 1), uint8 labels, macOS '._' junk alongside."""
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True)
    training, test = [], []
    for i in range(cases + tests):
        name = f"case_{i:03d}.nii.gz"
        data = [rng.integers(-100, 1000, SHAPE).astype(np.int16) for _ in range(channels)]
        folder = "imagesTr" if i < cases else "imagesTs"
        if channels == 1:
            sitk.WriteImage(_volume(data[0]), str(root / folder / name))
        else:
            _write_4d(data, root / folder / name)
        if i < cases:
            sitk.WriteImage(_volume(rng.integers(0, 3, SHAPE).astype(np.uint8)), str(root / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    meta = {"name": "Fake", "description": "tiny", "tensorImageSize": "4D" if channels > 1 else "3D",
            "modality": {str(c): m for c, m in enumerate(["FLAIR", "T1w", "t1gd", "T2w"][:channels])},
            "labels": {"0": "background", "1": "edema", "2": "tumour"},
            "numTraining": cases, "numTest": tests, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


@pytest.fixture
def msd4d(tmp_path: Path) -> Path:
    return make_msd_task(tmp_path / "Task01_Fake", channels=2)


def _source_channel(path: Path, c: int) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[c]


def test_4d_task_becomes_one_file_per_channel_in_nnunet_layout(msd4d: Path, tmp_path: Path):
    dst = convert_msd(msd4d, tmp_path / "Dataset001_Fake", jobs=1)
    assert dst == tmp_path / "Dataset001_Fake"
    assert sorted(p.name for p in (dst / "imagesTr").iterdir()) == [
        f"case_{i:03d}_{c:04d}.nii.gz" for i in range(3) for c in range(2)]
    assert sorted(p.name for p in (dst / "labelsTr").iterdir()) == [f"case_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (dst / "imagesTs").iterdir()) == ["case_003_0000.nii.gz", "case_003_0001.nii.gz"]
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w"}
    assert meta["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    assert (meta["numTraining"], meta["file_ending"], meta["name"]) == (3, ".nii.gz", "Fake")
    assert "tensorImageSize" not in meta  # it said 4D; the converted files are 3D


def test_split_channels_keep_voxels_type_and_3d_geometry(msd4d: Path, tmp_path: Path):
    dst = convert_msd(msd4d, tmp_path / "out", jobs=1)
    source = msd4d / "imagesTr" / "case_001.nii.gz"
    ref = sitk.ReadImage(str(source))  # what SimpleITK makes of the 4D header: size (x, y, z, c)
    assert ref.GetDimension() == 4 and ref.GetSize() == (*SHAPE[::-1], 2)
    block = np.asarray(ref.GetDirection()).reshape(4, 4)[:3, :3].ravel()
    for c in range(2):
        part = sitk.ReadImage(str(dst / "imagesTr" / f"case_001_{c:04d}.nii.gz"))
        assert part.GetDimension() == 3
        assert part.GetPixelID() == sitk.sitkInt16
        assert part.GetSpacing() == ref.GetSpacing()[:3] == SPACING
        assert part.GetOrigin() == ref.GetOrigin()[:3] == ORIGIN
        assert part.GetDirection() == tuple(block) == DIRECTION
        np.testing.assert_array_equal(sitk.GetArrayFromImage(part), _source_channel(source, c))


def test_converted_dataset_loads_with_the_right_cases(msd4d: Path, tmp_path: Path):
    ds = load_dataset(convert_msd(msd4d, tmp_path / "out", jobs=1))
    assert ds.channel_names == ["FLAIR", "T1w"] and ds.num_training == 3
    cases = ds.cases()
    assert [c.id for c in cases] == ["case_000", "case_001", "case_002"]
    assert all(p.is_file() for c in cases for p in c.images) and all(c.label.is_file() for c in cases)
    assert [c.id for c in ds.cases("Ts")] == ["case_003"]
    image, geometry = read_image(cases[0].images[1])
    label, label_geometry = read_label(cases[0].label)
    assert image.shape == (1, *SHAPE) and label.shape == SHAPE and geometry == label_geometry


def test_single_channel_3d_task_is_copied_exactly(tmp_path: Path):
    src = make_msd_task(tmp_path / "Task04_Fake", channels=1, cases=2, tests=0)
    dst = convert_msd(src, tmp_path / "out", jobs=1)
    for i in range(2):
        assert (dst / "imagesTr" / f"case_{i:03d}_0000.nii.gz").read_bytes() == \
            (src / "imagesTr" / f"case_{i:03d}.nii.gz").read_bytes()
        assert (dst / "labelsTr" / f"case_{i:03d}.nii.gz").read_bytes() == \
            (src / "labelsTr" / f"case_{i:03d}.nii.gz").read_bytes()
    ds = load_dataset(dst)
    assert ds.channel_names == ["FLAIR"] and [c.id for c in ds.cases()] == ["case_000", "case_001"]
    assert ds.cases("Ts") == []


def test_parallel_conversion_gives_the_same_files(msd4d: Path, tmp_path: Path):
    one, two = convert_msd(msd4d, tmp_path / "one", jobs=1), convert_msd(msd4d, tmp_path / "two", jobs=2)
    names = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for n in names:
        if n.suffix == ".gz":
            np.testing.assert_array_equal(read_image(one / n)[0], read_image(two / n)[0])


def test_without_a_test_list_imagests_is_listed_and_junk_skipped(msd4d: Path, tmp_path: Path):
    meta = json.loads((msd4d / "dataset.json").read_text())
    del meta["test"]
    meta["training"].append({"image": "./imagesTr/._case_000.nii.gz", "label": "./labelsTr/._case_000.nii.gz"})
    (msd4d / "dataset.json").write_text(json.dumps(meta))
    dst = convert_msd(msd4d, tmp_path / "out", jobs=1)
    assert [c.id for c in load_dataset(dst).cases("Ts")] == ["case_003"]
    assert json.loads((dst / "dataset.json").read_text())["numTraining"] == 3
    assert not any(p.name.startswith("._") for p in dst.rglob("*"))


def test_empty_existing_destination_is_used(msd4d: Path, tmp_path: Path):
    (tmp_path / "out").mkdir()
    assert (convert_msd(msd4d, tmp_path / "out", jobs=1) / "dataset.json").is_file()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_non_empty_destination_is_refused(msd4d: Path, tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"out: already exists and is not empty"):
        convert_msd(msd4d, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("content, message", [
    (None, r"dataset\.json: missing"),
    ("{not json", r"dataset\.json: not valid JSON"),
    ('{"modality": {"0": "CT"}, "labels": {"0": "background"}}', r"lacks the MSD key\(s\) 'training'"),
    ('{"modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": ["a"]}', r"'training' must be a list of"),
    ('{"modality": {"1": "CT"}, "labels": {"0": "bg"}, "training": []}', r"'modality' keys must be 0\.\.0"),
])
def test_bad_msd_dataset_json_is_one_clear_line(tmp_path: Path, content: str | None, message: str):
    src = tmp_path / "Task09_Bad"
    src.mkdir()
    if content is not None:
        (src / "dataset.json").write_text(content)
    with pytest.raises(UserError, match=message) as e:
        convert_msd(src, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_source_folder_is_named(tmp_path: Path):
    with pytest.raises(UserError, match=r"Task00_Nowhere: MSD task folder not found"):
        convert_msd(tmp_path / "Task00_Nowhere", tmp_path / "out")


def test_missing_referenced_file_is_named_and_nothing_is_written(msd4d: Path, tmp_path: Path):
    (msd4d / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(UserError, match=r"labelsTr/case_002\.nii\.gz: listed in .*dataset\.json but not found"):
        convert_msd(msd4d, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_channel_count_differing_from_modality_fails_without_leftovers(msd4d: Path, tmp_path: Path):
    meta = json.loads((msd4d / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "T2w"}
    (msd4d / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"case_000\.nii\.gz: has 2 channel\(s\) but dataset\.json 'modality' lists 3"):
        convert_msd(msd4d, tmp_path / "out", jobs=1)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
