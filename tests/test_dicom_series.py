"""autoseg.dicom.series: series found by UID in a folder tree, built with the geometry they were written with."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom")

from autoseg.dicom.series import find_series, is_dicom_folder  # noqa: E402
from autoseg.errors import UserError  # noqa: E402
from tests.dicom_series import Study, corrupt, oblique_direction, volume_image, write_series  # noqa: E402


def _volume(seed: int = 0, shape=(7, 12, 10), low=-1000, high=1500) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.float32)


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_oblique_ct_in_shuffled_files_reads_back_in_hu_with_its_geometry(tmp_path):
    written = volume_image(_volume(), direction=oblique_direction(25))
    files = write_series(written, tmp_path / "ct", slope=0.5, intercept=-1024, seed=3)
    assert sorted(files) != files  # the file names do not follow the slices
    found = find_series(tmp_path)
    assert len(found.series) == 1 and not found.objects
    series = found.series[0]
    assert series.files == tuple(files) and series.modality == "CT"
    _same_geometry(series.image, written)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(series.image), sitk.GetArrayFromImage(written))
    # an independent reader (GDCM, through SimpleITK) agrees on geometry and values
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    gdcm = reader.Execute()
    _same_geometry(series.image, gdcm)
    np.testing.assert_allclose(sitk.GetArrayFromImage(series.image), sitk.GetArrayFromImage(gdcm), atol=1e-3)


def test_several_series_without_extensions_in_nested_folders_are_told_apart(tmp_path):
    study = Study.new()
    mr = volume_image(_volume(1, low=0, high=900), spacing=(1.0, 1.0, 3.0), direction=oblique_direction(-15))
    ct = volume_image(_volume(2), spacing=(0.6, 0.6, 1.5))
    write_series(mr, tmp_path / "p1" / "study", modality="MR", extension="", study=study, description="T1",
                 name_prefix="mr")
    write_series(ct, tmp_path / "p1" / "study", study=study, description="CT abdomen", series_number=2,
                 name_prefix="ct")
    (tmp_path / "p1" / "notes.txt").write_text("not DICOM")
    assert is_dicom_folder(tmp_path)
    found = find_series(tmp_path)
    assert [s.description for s in found.series] == ["CT abdomen", "T1"]
    assert [s.modality for s in found.series] == ["CT", "MR"]
    _same_geometry(found.series[1].image, mr)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(found.series[1].image), sitk.GetArrayFromImage(mr))


def test_a_missing_slice_is_refused_naming_the_file_after_the_gap(tmp_path):
    files = write_series(volume_image(_volume()), tmp_path, shuffle=False)
    files[3].unlink()
    with pytest.raises(UserError, match=rf"^{files[4]}: 1 slice\(s\) missing"):
        _ = find_series(tmp_path).series[0].image


def test_gantry_tilt_and_uneven_spacing_are_refused(tmp_path):
    import pydicom

    files = write_series(volume_image(_volume()), tmp_path / "tilt", shuffle=False)
    for k, f in enumerate(files):  # each slice shifted along y: a tilted gantry
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.4 * k, z]
        ds.save_as(f)
    with pytest.raises(UserError, match="not stacked along their normal"):
        _ = find_series(tmp_path / "tilt").series[0].image
    files = write_series(volume_image(_volume()), tmp_path / "uneven", shuffle=False)
    ds = pydicom.dcmread(files[-1])
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 1.0]
    ds.save_as(files[-1])
    with pytest.raises(UserError, match=rf"^{files[-1]}: uneven slice spacing"):
        _ = find_series(tmp_path / "uneven").series[0].image


def test_corrupt_and_non_dicom_files_are_one_line_naming_them(tmp_path):
    files = write_series(volume_image(_volume()), tmp_path / "cut")
    corrupt(files[2])
    with pytest.raises(UserError, match=rf"^{files[2]}: "):
        _ = find_series(tmp_path / "cut").series[0].image
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "IM0001").write_bytes(b"\x00" * 300)
    with pytest.raises(UserError, match=rf"^{tmp_path / 'junk' / 'IM0001'}: not a DICOM file"):
        find_series(tmp_path / "junk")


def test_series_are_chosen_by_uid_or_description_and_never_guessed(tmp_path):
    from autoseg.dicom.choose import choose_series
    from autoseg.dicom.seg import write_seg

    study = Study.new()
    for k, name in enumerate(("T1", "T2", "t2")):
        write_series(volume_image(_volume(k, low=0, high=900)), tmp_path / name, modality="MR", study=study,
                     description=name, name_prefix=name)
    found = find_series(tmp_path)
    t1 = next(s for s in found.series if s.description == "T1")
    assert choose_series(found, [t1.uid], ["MRI"]) == [t1]
    assert choose_series(found, ["t1"], ["MRI"]) == [t1]  # case-insensitive when nothing matches exactly
    assert [s.description for s in choose_series(found, ["1=T2", "0=t2"], ["T1", "T2"])] == ["t2", "T2"]
    with pytest.raises(UserError, match="3 image series; choose one with --series"):
        choose_series(found, [], ["MRI"])
    with pytest.raises(UserError, match="map a series to each with --series 0=UID"):
        choose_series(found, [], ["T1", "T2"])
    with pytest.raises(UserError, match="no series for channel 1"):
        choose_series(found, ["0=T1"], ["T1", "T2"])
    with pytest.raises(UserError, match="say which channel each is"):
        choose_series(found, ["T1", "T2"], ["T1", "T2"])
    with pytest.raises(UserError, match="no series with that SeriesInstanceUID or description"):
        choose_series(found, ["FLAIR"], ["MRI"])
    labels = np.zeros((7, 12, 10), np.uint8)
    labels[2:4, 3:6, 3:6] = 1
    seg = write_seg(labels, t1, {1: "lesion"}, tmp_path / "seg" / "s.dcm")
    found = find_series(tmp_path)
    assert [o.modality for o in found.objects] == ["SEG"]
    seg_series = found.objects[0].series_uid
    with pytest.raises(UserError, match=rf"^{seg}: --series {seg_series}: a SEG object"):
        choose_series(found, [seg_series], ["MRI"])


def test_without_the_extra_the_error_names_it(monkeypatch, tmp_path):
    import sys

    from autoseg.dicom import require

    monkeypatch.setitem(sys.modules, "highdicom", None)  # what an environment without the package gives
    with pytest.raises(UserError, match=r"needs highdicom, which is not installed: pip install 'autoseg\[dicom\]'"):
        require("highdicom")


def test_compressed_slices_are_read_or_named_with_what_would_decode_them(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, RLELossless

    written = volume_image(_volume())
    files = write_series(written, tmp_path, shuffle=False)
    ds = pydicom.dcmread(files[0])
    ds.compress(RLELossless)  # pydicom decodes RLE itself
    ds.save_as(files[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(find_series(tmp_path).series[0].image),
                                  sitk.GetArrayFromImage(written))
    ds = pydicom.dcmread(files[1])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 50])  # a codestream no decoder accepts
    ds.save_as(files[1])
    with pytest.raises(UserError, match=rf"^{files[1]}: compressed pixel data \(JPEG 2000.*pip install pylibjpeg") as e:
        _ = find_series(tmp_path).series[0].image
    assert "\n" not in str(e.value)
