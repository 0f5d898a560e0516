"""``autoseg predict`` on DICOM series: CT and two-channel MR written as real series (oblique, shuffled file
order, with and without ``.dcm``) predict exactly what the same volumes predict as NIfTI; ``--output-format
seg`` writes a SEG that pydicom and highdicom read back voxel for voxel and dciodvfy passes; bad DICOM is one
line naming the file, exit code 2, nothing written.

Models are random-init networks (as in test_predict): the plumbing is what is tested.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

hd = pytest.importorskip("highdicom")

import pydicom  # noqa: E402
from test_predict import make_workdir  # noqa: E402

from autoseg.bundle import load_bundle, pack_bundle, read_archive  # noqa: E402
from autoseg.bundle.archive import write_archive  # noqa: E402
from autoseg.cli import run  # noqa: E402
from autoseg.dicom.seg import read_seg  # noqa: E402
from autoseg.dicom.series import find_series  # noqa: E402
from autoseg.errors import UserError  # noqa: E402
from autoseg.io import read_label  # noqa: E402
from autoseg.schema.selection import Selection  # noqa: E402
from tests.dicom_series import Study, corrupt, oblique_direction, volume_image, write_series  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Path, Path]:
    """A ct-aniso model, and one of its test volumes (HU rounded to integers, an oblique right-handed direction)
    written both as NIfTI (``nifti/case.nii.gz``) and as a shuffled DICOM series without extensions (``dicom/``)."""
    root = tmp_path_factory.mktemp("dicom_ct")
    ds, work, _ = make_workdir(root, "ct-aniso", "3d_fullres", 3, [8, 16, 16], [1, 2], cases=3)
    image = sitk.ReadImage(str(sorted((ds / "imagesTs").glob("*_0000.nii.gz"))[0]))
    volume = volume_image(np.round(sitk.GetArrayFromImage(image)).astype(np.float32), spacing=image.GetSpacing(),
                          origin=(-12.5, 30.0, 7.25), direction=oblique_direction(20))
    (root / "nifti").mkdir()
    sitk.WriteImage(volume, str(root / "nifti" / "case.nii.gz"))
    write_series(volume, root / "dicom", slope=1.0, intercept=-1024.0, extension="", seed=1, description="CT")
    return work, root


def _predict(*args: str) -> int:
    return run(["predict", *map(str, args), "--mirror", "off", "-q"])


def test_ct_series_predicts_as_nifti_and_its_seg_reads_back_voxel_for_voxel(ct, tmp_path):
    work, root = ct
    assert _predict(work, root / "nifti", tmp_path / "nifti") == 0
    assert _predict(work, root / "dicom", tmp_path / "nii", "--output-format", "nii.gz") == 0
    assert _predict(work, root / "dicom", tmp_path / "seg", "--output-format", "seg") == 0
    want, g_want = read_label(tmp_path / "nifti" / "case.nii.gz")
    assert len(np.unique(want)) > 1  # something to compare
    got, g_got = read_label(tmp_path / "nii" / "dicom.nii.gz")
    np.testing.assert_array_equal(got, want)
    assert g_got.mismatch(g_want, rtol=1e-5, atol=1e-5) is None
    seg_file = tmp_path / "seg" / "dicom.seg.dcm"
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == [seg_file.name]
    series = find_series(root / "dicom").series[0]
    ds = pydicom.dcmread(seg_file)  # pydicom: a SEG referencing the source series, a segment per class
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    assert ds.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "tumour"]
    labels, names = read_seg(seg_file, series)  # highdicom, on the source slices in order
    assert names == {1: "liver", 2: "tumour"}
    np.testing.assert_array_equal(labels, want)


def test_dciodvfy_finds_no_error_in_the_seg(ct, tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    work, root = ct
    codes = tmp_path / "codes.json"
    codes.write_text('{"liver": {"category": "SCT:123037004:Anatomical Structure", "type": "SCT:10200004:Liver"}}')
    assert _predict(work, root / "dicom", tmp_path / "seg", "--output-format", "seg", "--segment-codes", codes) == 0
    seg_file = tmp_path / "seg" / "dicom.seg.dcm"
    ds = pydicom.dcmread(seg_file)
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # generic
    result = subprocess.run(["dciodvfy", str(seg_file)], capture_output=True, text=True)
    assert "Error" not in result.stderr + result.stdout, result.stderr


def test_a_codes_file_naming_no_class_of_the_model_is_refused(ct, tmp_path, capsys):
    work, root = ct
    codes = tmp_path / "codes.json"
    codes.write_text('{"livr": {"type": "SCT:10200004:Liver"}}')
    assert _predict(work, root / "dicom", tmp_path / "seg", "--output-format", "seg", "--segment-codes", codes) == 2
    _one_error(capsys, str(codes), "'livr' is not a class of the model (its classes: liver, tumour)")
    assert not (tmp_path / "seg").exists()


def test_bundle_predicts_a_dicom_folder_as_the_cli_does(ct, tmp_path):
    work, root = ct
    seg, geometry = load_bundle(pack_bundle(work, tmp_path / "m.autoseg")).predict(root / "dicom", mirror="off")
    assert _predict(work, root / "dicom", tmp_path / "out") == 0
    want, g_want = read_label(tmp_path / "out" / "dicom.nii.gz")
    np.testing.assert_array_equal(seg, want)
    assert geometry.mismatch(g_want, rtol=1e-5, atol=1e-5) is None


def test_two_channel_mr_takes_one_series_per_channel_by_mapping(tmp_path, capsys):
    ds, work, _ = make_workdir(tmp_path, "mr-2ch", "3d_fullres", 3, [8, 16, 16], [1, 2], cases=3)
    study = Study.new()
    (tmp_path / "nifti").mkdir()
    for c, name in enumerate(("T1", "T2")):
        image = sitk.ReadImage(str(sorted((ds / "imagesTs").glob(f"*_000{c}.nii.gz"))[0]))
        array = np.clip(np.round(sitk.GetArrayFromImage(image) * 100), 0, 60000).astype(np.float32)
        volume = volume_image(array, spacing=image.GetSpacing(), direction=oblique_direction(-30))
        sitk.WriteImage(volume, str(tmp_path / "nifti" / f"case_000{c}.nii.gz"))
        write_series(volume, tmp_path / "dicom", modality="MR", study=study, description=name, seed=c,
                     name_prefix=name, extension=".dcm" if c else "", series_number=c + 1)
    found = find_series(tmp_path / "dicom")
    t1 = next(s.uid for s in found.series if s.description == "T1")
    assert _predict(work, tmp_path / "dicom", tmp_path / "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--series 0=UID --series 1=UID" in err[0] and t1 in err[0]
    assert not (tmp_path / "none").exists()
    assert _predict(work, tmp_path / "dicom", tmp_path / "out", "--series", f"0={t1}", "--series", "1=T2") == 0
    assert _predict(work, tmp_path / "nifti", tmp_path / "ref") == 0
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "dicom.nii.gz")[0],
                                  read_label(tmp_path / "ref" / "case.nii.gz")[0])


def _one_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoseg: error: "), err
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


def test_bad_dicom_is_one_line_naming_the_file_and_nothing_is_written(ct, tmp_path, capsys):
    work, root = ct
    out = tmp_path / "out" / "deeper"
    missing = shutil.copytree(root / "dicom", tmp_path / "missing")
    files = find_series(missing).series[0].files
    files[2].unlink()
    assert _predict(work, missing, out) == 2
    _one_error(capsys, str(files[3]), "missing")
    assert not (tmp_path / "out").exists()

    mixed = shutil.copytree(root / "dicom", tmp_path / "mixed")
    write_series(volume_image(np.zeros((3, 8, 8), np.float32)), mixed / "other", description="scout")
    assert _predict(work, mixed, out) == 2
    _one_error(capsys, "2 image series", "--series", "scout", "'CT'")

    cut = shutil.copytree(root / "dicom", tmp_path / "cut")
    corrupt(find_series(cut).series[0].files[1])
    assert _predict(work, cut, out) == 2
    _one_error(capsys, str(find_series(cut).series[0].files[1]))
    assert not (tmp_path / "out").exists()

    assert _predict(work, root / "dicom", tmp_path / "seg", "--output-format", "seg") == 0
    capsys.readouterr()
    only_seg = tmp_path / "only_seg"
    only_seg.mkdir()
    shutil.copy(tmp_path / "seg" / "dicom.seg.dcm", only_seg / "labels.dcm")
    assert _predict(work, only_seg, out) == 2
    _one_error(capsys, str(only_seg / "labels.dcm"), "SEG", "not a slice of an image series")

    assert _predict(work, root / "nifti", out, "--output-format", "seg") == 2
    _one_error(capsys, "--output-format seg", "needs DICOM input")
    assert not (tmp_path / "out").exists()


def test_rtstruct_output_converts_back_to_the_nifti_prediction(ct, tmp_path):
    pytest.importorskip("autoseg.dicom.rtstruct")  # helper 22b's writer and reader
    work, root = ct
    assert _predict(work, root / "nifti", tmp_path / "ref") == 0
    assert _predict(work, root / "dicom", tmp_path / "rt", "--output-format", "rtstruct") == 0
    study = shutil.copytree(root / "dicom", tmp_path / "study" / "ct")
    shutil.copy(tmp_path / "rt" / "dicom.rtstruct.dcm", study.parent / "rt.dcm")
    assert run(["convert-dicom", str(study.parent), str(tmp_path / "ds"), "-q", "-j", "1"]) == 0
    got, _ = read_label(tmp_path / "ds" / "labelsTr" / "ANON0001.nii.gz")
    want, _ = read_label(tmp_path / "ref" / "case.nii.gz")
    for value in (1, 2):  # contours rasterised back: Dice per structure
        a, b = got == value, want == value
        assert 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) >= 0.95


def test_rtstruct_without_its_module_is_one_line_before_any_work(ct, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "autoseg.dicom.rtstruct" else find_spec(name, *a))
    work, root = ct
    assert _predict(work, root / "dicom", tmp_path / "rt", "--output-format", "rtstruct") == 2
    _one_error(capsys, "--output-format rtstruct", "not available")
    assert not (tmp_path / "rt").exists()


def test_a_channel_on_another_grid_is_resampled_only_within_one_frame_of_reference(tmp_path, capsys):
    ds, work, _ = make_workdir(tmp_path, "mr-2ch", "3d_fullres", 3, [8, 16, 16], [1, 2], cases=3)
    images = [sitk.ReadImage(str(sorted((ds / "imagesTs").glob(f"*_000{c}.nii.gz"))[0])) for c in (0, 1)]
    t1 = volume_image(np.clip(np.round(sitk.GetArrayFromImage(images[0]) * 100), 0, 60000).astype(np.float32),
                      spacing=images[0].GetSpacing(), direction=oblique_direction(-30))
    coarse = [s * 1.5 for s in t1.GetSpacing()]  # a T2 at 1.5 times the voxel size, over the same field of view
    size = [int(n / 1.5) for n in t1.GetSize()]
    t2 = sitk.Resample(t1, size, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), coarse, t1.GetDirection())
    study = Study.new()
    for folder, t2_study in (("same", study), ("other", Study.new())):
        write_series(t1, tmp_path / folder / "t1", modality="MR", study=study, description="T1")
        write_series(t2, tmp_path / folder / "t2", modality="MR", study=t2_study, description="T2", series_number=2)
    choice = ["--series", "0=T1", "--series", "1=T2"]
    assert _predict(work, tmp_path / "same", tmp_path / "out", *choice) == 0
    assert "resampled onto the grid of channel 0's series" in capsys.readouterr().err
    pred, geometry = read_label(tmp_path / "out" / "same.nii.gz")
    assert pred.shape == sitk.GetArrayFromImage(t1).shape
    np.testing.assert_allclose(geometry.spacing, t1.GetSpacing()[::-1], atol=1e-5)  # channel 0's grid
    np.testing.assert_allclose(geometry.origin, t1.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(geometry.direction, t1.GetDirection(), atol=1e-6)
    assert _predict(work, tmp_path / "other", tmp_path / "out2", *choice) == 2
    _one_error(capsys, str(tmp_path / "other" / "t2"), "another frame of reference")
    assert not (tmp_path / "out2").exists()


LIVER = {"category": "SCT:123037004:Anatomical Structure", "type": "SCT:10200004:Liver"}
TUMOUR = {"category": "SCT:49755003:Morphologically Altered Structure", "type": "SCT:108369006:Neoplasm"}


def _codes_file(path: Path, codes: dict) -> Path:
    path.write_text(json.dumps(codes))
    return path


def _segment_codes(seg_file: Path) -> dict[str, tuple[str, str]]:
    """Segment label -> (category code value, type code value), read back with highdicom."""
    seg = hd.seg.segread(seg_file)
    return {d.segment_label: (d.segmented_property_category.value, d.segmented_property_type.value)
            for d in (seg.get_segment_description(int(s.SegmentNumber)) for s in seg.SegmentSequence)}


def test_codes_packed_with_the_bundle_are_in_its_manifest_and_model_card(ct, tmp_path):
    work, _ = ct
    codes = _codes_file(tmp_path / "codes.json", {"liver": LIVER, "tumour": {"type": TUMOUR["type"]}})
    bundle = tmp_path / "m.autoseg"
    assert run(["bundle", str(work), "-o", str(bundle), "--segment-codes", str(codes), "-q"]) == 0
    manifest, members = read_archive(bundle)
    assert manifest["segment_codes"] == {"liver": LIVER, "tumour": {"type": TUMOUR["type"]}}
    card = members["README.md"].decode()
    assert "## DICOM segment codes" in card
    assert "| liver | Anatomical Structure (123037004) | Liver (10200004) | SCT |" in card
    assert "| tumour | Anatomical Structure (91723000) | Neoplasm (108369006) | SCT |" in card  # generic category
    assert load_bundle(bundle).segment_codes["liver"]["type"] == ("SCT", "10200004", "Liver")
    plain = pack_bundle(work, tmp_path / "plain.autoseg")  # no codes: no key, no section, generic segments
    manifest, members = read_archive(plain)
    assert "segment_codes" not in manifest and "segment codes" not in members["README.md"].decode()


def test_a_seg_from_the_bundle_carries_its_codes_and_a_codes_file_overrides_them_class_by_class(ct, tmp_path):
    work, root = ct
    bundle = pack_bundle(work, tmp_path / "m.autoseg",
                         segment_codes=_codes_file(tmp_path / "codes.json", {"liver": LIVER, "tumour": TUMOUR}))
    assert _predict(bundle, root / "dicom", tmp_path / "seg", "--output-format", "seg") == 0
    seg_file = tmp_path / "seg" / "dicom.seg.dcm"
    assert _segment_codes(seg_file) == {"liver": ("123037004", "10200004"), "tumour": ("49755003", "108369006")}
    ds = pydicom.dcmread(seg_file)  # the same, as pydicom reads the sequences
    assert ds.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
    site = _codes_file(tmp_path / "site.json", {"tumour": {"type": "SCT:363346000:Malignant neoplastic disease"}})
    assert _predict(bundle, root / "dicom", tmp_path / "over", "--output-format", "seg", "--segment-codes", site) == 0
    assert _segment_codes(tmp_path / "over" / "dicom.seg.dcm") == {
        "liver": ("123037004", "10200004"),  # the bundle's
        "tumour": ("91723000", "363346000")}  # the file's entry, whole: its category is the generic one


@pytest.mark.parametrize(("codes", "needle"), [
    ({"livr": LIVER}, "'livr' is not a class of the model (its classes: liver, tumour)"),
    ({"liver": {"type": "Liver"}}, "liver.type: code 'Liver' is not SCHEME:VALUE:MEANING"),
    ([], "expected an object mapping class names"),
])
def test_a_bad_codes_file_at_packing_is_one_line_and_writes_no_bundle(ct, tmp_path, capsys, codes, needle):
    work, _ = ct
    bad = _codes_file(tmp_path / "bad.json", codes)
    assert run(["bundle", str(work), "-o", str(tmp_path / "m.autoseg"), "--segment-codes", str(bad), "-q"]) == 2
    _one_error(capsys, str(bad), needle)
    assert not (tmp_path / "m.autoseg").exists()


def test_a_bundle_whose_manifest_codes_name_no_class_is_refused(ct, tmp_path):
    work, _ = ct
    manifest, members = read_archive(pack_bundle(work, tmp_path / "m.autoseg"))
    write_archive(members, {**manifest, "segment_codes": {"livr": LIVER}}, tmp_path / "bad.autoseg")
    with pytest.raises(UserError, match=r"bad.autoseg: manifest.json segment_codes: 'livr' is not a class"):
        load_bundle(tmp_path / "bad.autoseg")


def test_a_workdir_whose_selection_has_codes_predicts_and_packs_them(ct, tmp_path):
    work, root = ct
    copy = shutil.copytree(work, tmp_path / "work")
    Selection(configuration="3d_fullres", segment_codes={"liver": LIVER}).save(copy / "selection.json")
    assert _predict(copy, root / "dicom", tmp_path / "seg", "--output-format", "seg") == 0
    assert _segment_codes(tmp_path / "seg" / "dicom.seg.dcm") == {"liver": ("123037004", "10200004"),
                                                                 "tumour": ("91723000", "85756007")}  # generic
    over = _codes_file(tmp_path / "over.json", {"tumour": TUMOUR})
    manifest, _ = read_archive(pack_bundle(copy, segment_codes=over))
    assert manifest["segment_codes"] == {"liver": LIVER, "tumour": TUMOUR}
