"""``autoseg convert-dicom``: a NIfTI dataset written as DICOM series + SEG objects converts back to the same
label maps and geometry, validated; broken inputs are one line and leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("highdicom")

from autoseg.cli import run  # noqa: E402
from autoseg.dicom.seg import write_seg  # noqa: E402
from autoseg.dicom.series import find_series  # noqa: E402
from autoseg.io import read_image, read_label  # noqa: E402
from autoseg.synth import generate  # noqa: E402
from tests.dicom_series import Study, oblique_direction, volume_image, write_series  # noqa: E402


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> tuple[Path, Path]:
    """A NIfTI dataset (ct-aniso's labels and HU on an oblique right-handed grid; three cases, one patient twice)
    and the same cases as DICOM studies: a shuffled series and a SEG referencing it per case."""
    root = tmp_path_factory.mktemp("convert")
    synth = generate("ct-aniso", root / "synth", size="tiny", cases=3, seed=4)
    meta = json.loads((synth / "dataset.json").read_text())
    names = {v: k for k, v in meta["labels"].items() if v}
    nifti = root / "nifti"
    (nifti / "imagesTr").mkdir(parents=True)
    (nifti / "labelsTr").mkdir()
    for i, label_file in enumerate(sorted((synth / "labelsTr").glob("*.nii.gz"))):
        cid = label_file.name[: -len(".nii.gz")]
        image = sitk.ReadImage(str(synth / "imagesTr" / f"{cid}_0000.nii.gz"))
        geometry = dict(spacing=image.GetSpacing(), origin=(5.0 * i, -3.0, 40.0), direction=oblique_direction(10 + i))
        volume = volume_image(np.round(sitk.GetArrayFromImage(image)).astype(np.float32), **geometry)
        labels = volume_image(sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))).astype(np.uint8), **geometry)
        patient = "PAT1" if i < 2 else "PAT2"
        sitk.WriteImage(volume, str(nifti / "imagesTr" / f"{patient}_{i}_0000.nii.gz"))
        sitk.WriteImage(labels, str(nifti / "labelsTr" / f"{patient}_{i}.nii.gz"))
        folder = root / "dicom" / patient / f"study{i}" / "ct"
        write_series(volume, folder, study=Study.new(patient), seed=i, extension="" if i % 2 else ".dcm")
        series = find_series(folder).series[0]
        write_seg(sitk.GetArrayFromImage(labels), series, names, root / "dicom" / patient / f"study{i}" / "seg.dcm")
    return nifti, root / "dicom"


def test_nifti_to_dicom_seg_and_back_gives_the_same_labels_and_geometry(studies, tmp_path, capsys):
    nifti, dicom = studies
    assert run(["convert-dicom", str(dicom), str(tmp_path / "Dataset009_Back"), "-q", "-j", "1"]) == 0
    out = tmp_path / "Dataset009_Back"
    assert "3 case(s), labels 1 liver, 2 tumour" in capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "tumour": 2} and meta["channel_names"] == {"0": "CT"}
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["PAT1.nii.gz", "PAT1_2.nii.gz", "PAT2.nii.gz"]
    originals = sorted((nifti / "labelsTr").iterdir())
    for original, converted in zip(originals, sorted((out / "labelsTr").iterdir())):
        want, g_want = read_label(original)
        got, g_got = read_label(converted)
        np.testing.assert_array_equal(got, want)
        assert g_got.mismatch(g_want, rtol=1e-5, atol=1e-5) is None
        image, _ = read_image(out / "imagesTr" / converted.name.replace(".nii.gz", "_0000.nii.gz"))
        np.testing.assert_array_equal(image, read_image(nifti / "imagesTr" /
                                                        original.name.replace(".nii.gz", "_0000.nii.gz"))[0])
    assert run(["validate", str(out), "-q", "-j", "1"]) == 0


def test_a_seg_whose_series_is_missing_is_one_line_and_nothing_is_left(studies, tmp_path, capsys):
    _, dicom = studies
    broken = shutil.copytree(dicom, tmp_path / "broken")
    shutil.rmtree(broken / "PAT2" / "study2" / "ct")
    assert run(["convert-dicom", str(broken), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken / "PAT2" / "study2" / "seg.dcm") in err[0] and "not under" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
    assert run(["convert-dicom", str(broken / "PAT1" / "study0" / "ct"), str(tmp_path / "out"), "-q"]) == 2
    assert "no SEG or RTSTRUCT object" in capsys.readouterr().err
