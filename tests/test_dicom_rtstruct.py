"""RT Structure Sets: a label map written as contours, read back by pydicom and rasterised onto the series'
grid, gives each structure back (Dice >= 0.95; measured: exactly, Dice 1.0) on CT and MR, axis-aligned and
oblique series, with holes, several components per slice, regions (overlapping ROIs) and diagonal single voxels,
from the API and from `autoseg predict --output-format rtstruct`; dciodvfy finds no error; a bad structure set is
one UserError naming the file. (highdicom 0.28 has no RT Structure Set support, so pydicom reads them back.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("skimage")

from pydicom.uid import generate_uid  # noqa: E402

from autoseg.dicom.rtstruct import (  # noqa: E402
    fill_even_odd,
    read_rtstruct,
    roi_names,
    slice_contours,
    write_rtstruct,
)
from autoseg.dicom.series import DicomSeries, find_series  # noqa: E402
from autoseg.errors import UserError  # noqa: E402
from tests.dicom_series import oblique_direction, volume_image, write_series  # noqa: E402
from tests.test_dicom_predict import ct  # noqa: E402, F401  (the fixture: a model and a DICOM series of a volume)

SHAPE = (10, 32, 28)  # (z, y, x)
SPACING = (0.8, 0.9, 2.5)  # (x, y, z), SimpleITK order
OBLIQUE = oblique_direction(25)


def _series(folder: Path, direction=None, modality: str = "CT") -> DicomSeries:
    """A CT (or MR) series written as real DICOM files in shuffled order, and read back by the reader."""
    write_series(volume_image(np.zeros(SHAPE, np.float32), SPACING, direction=direction), folder,
                 modality=modality)
    (series,) = find_series(folder).series
    return series


def _labels() -> np.ndarray:
    """1: a hollow ball (a hole on its middle slices); 2: two boxes side by side (two components per slice);
    3: voxels touching only at corners; 4: absent."""
    z, y, x = np.indices(SHAPE)
    r = np.sqrt(((x - 10) * SPACING[0]) ** 2 + ((y - 12) * SPACING[1]) ** 2 + ((z - 5) * SPACING[2]) ** 2)
    lab = np.zeros(SHAPE, np.uint8)
    lab[(r < 9) & (r > 4.5)] = 1
    lab[2:, 22:30, 20:26] = 2
    lab[2:, 4:8, 21:25] = 2
    for i in range(4):
        lab[5, 26 - i, 4 + i] = 3
    return lab


def _image(labels: np.ndarray, series: DicomSeries) -> sitk.Image:
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(series.image)
    return image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(autouse=True)
def strict_dicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value written must be valid for its VR (lengths, characters): pydicom raises instead of warning."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


NAMES = {1: "shell", 2: "boxes", 3: "diagonal", 4: "absent"}


@pytest.mark.parametrize(("modality", "direction"), [("CT", None), ("MR", OBLIQUE)], ids=["ct-axial", "mr-oblique"])
def test_contours_read_back_by_pydicom_rasterise_to_each_structure(tmp_path: Path, modality: str, direction):
    series = _series(tmp_path / "ct", direction, modality)
    labels = _labels()
    path = write_rtstruct(_image(labels, series), series, NAMES, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "RTSTRUCT" and roi_names(ds) == list(NAMES.values())
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    images = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert [i.ReferencedSOPInstanceUID for i in images] == [d.SOPInstanceUID for d in series.datasets]

    back = read_rtstruct(ds, series)
    assert back.GetSize() == series.image.GetSize() and back.GetDirection() == series.image.GetDirection()
    got = sitk.GetArrayFromImage(back)
    for value in (1, 2, 3):
        assert _dice(labels == value, got == value) >= 0.95
    assert np.array_equal(got, np.where(labels == 4, 0, labels))  # measured: the contours give every voxel back
    assert "ContourSequence" not in ds.ROIContourSequence[3]  # the absent class: an ROI without contours


def test_contours_lie_in_patient_coordinates_on_their_slice(tmp_path: Path):
    series = _series(tmp_path / "ct", OBLIQUE)
    labels = np.zeros(SHAPE, np.uint8)
    labels[3, 10:14, 8:12] = 1  # a 4 x 4 square on slice 3
    ds = pydicom.dcmread(write_rtstruct(_image(labels, series), series, {1: "square"}, tmp_path / "rt.dcm"))
    (contour,) = ds.ROIContourSequence[0].ContourSequence
    assert contour.ContourGeometricType == "CLOSED_PLANAR"
    assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID == series.datasets[3].SOPInstanceUID
    points = np.asarray(contour.ContourData, float).reshape(-1, 3)
    normal = np.asarray(series.image.GetDirection()).reshape(3, 3)[:, 2]
    slice_origin = np.asarray(series.datasets[3].ImagePositionPatient, float)
    assert np.abs((points - slice_origin) @ normal).max() < 1e-3  # on slice 3's plane, in mm
    # The isoline halfway between voxels: the 4 x 4 voxel square's corners cut, 8 points.
    assert contour.NumberOfContourPoints == 8


def test_a_hole_is_its_own_contour_filled_even_odd():
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    contours = slice_contours(ring)
    assert len(contours) == 2  # outer boundary and hole, each closed (first point not repeated)
    assert all(not np.allclose(c[0], c[-1]) for c in contours)


def test_scanline_fill_agrees_with_scikit_image_and_xors_rings():
    from skimage.draw import polygon

    rng = np.random.default_rng(0)
    shape = (40, 50)
    rings = [rng.uniform(-5, 55, (n, 2)) for n in (3, 7, 12)]  # self-intersecting, leaving the grid
    for ring in rings:
        expected = np.zeros(shape, bool)
        expected[polygon(ring[:, 1], ring[:, 0], shape=shape)] = True
        assert np.array_equal(fill_even_odd([ring], shape), expected)
    together = fill_even_odd(rings, shape)
    apart = [fill_even_odd([r], shape) for r in rings]
    assert np.array_equal(together, apart[0] ^ apart[1] ^ apart[2])


def test_a_structure_set_drawn_elsewhere_fills_the_voxels_inside_its_polygons(tmp_path: Path):
    """Not our writer's contours: a disc with a hole, drawn as 240-gons in patient coordinates on an oblique series,
    fills the voxels whose centres lie in the ring (compared with the ring computed from the voxel centres)."""
    series = _series(tmp_path / "ct", OBLIQUE)
    rt = write_rtstruct(np.zeros(SHAPE, np.uint8), series, {1: "ring"}, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(rt)
    axes = np.asarray(series.image.GetDirection()).reshape(3, 3)
    k, centre = 4, np.array([13.3, 15.1])  # slice, centre in (x, y) mm along the image's row and column axes
    origin = np.asarray(series.datasets[k].ImagePositionPatient, float)
    angles = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    items = []
    for radius in (9.0, 4.0):  # the outer boundary, then the hole
        in_plane = centre + radius * np.column_stack([np.cos(angles), np.sin(angles)])
        points = origin + in_plane @ axes[:, :2].T
        item = pydicom.Dataset()
        item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
        item.ContourData = [f"{v:.4f}" for v in points.ravel()]
        items.append(item)
    ds.ROIContourSequence[0].ContourSequence = items
    got = sitk.GetArrayFromImage(read_rtstruct(ds, series))

    y, x = np.indices(SHAPE[1:])
    distance = np.hypot(x * SPACING[0] - centre[0], y * SPACING[1] - centre[1])
    want = np.zeros(SHAPE, bool)
    want[k] = (distance < 9.0) & (distance > 4.0)
    assert want.sum() > 200 and _dice(got == 1, want) >= 0.99
    near_edge = (np.abs(distance - 9.0) < 0.01) | (np.abs(distance - 4.0) < 0.01)  # a 240-gon is not a circle there
    assert np.array_equal((got == 1)[k][~near_edge], want[k][~near_edge]) and not got[np.arange(10) != k].any()


def test_regions_become_overlapping_rois_painted_back_outer_first(tmp_path: Path):
    series = _series(tmp_path / "ct")
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:8, 5:25, 5:20] = 1
    labels[3:7, 8:20, 8:16] = 2
    labels[4:6, 10:14, 10:13] = 3
    classes = {(1, 2, 3): "whole tumour", (2, 3): "tumour core", (3,): "enhancing"}
    ds = pydicom.dcmread(write_rtstruct(_image(labels, series), series, classes, tmp_path / "rt.dcm"))
    back = sitk.GetArrayFromImage(read_rtstruct(ds, series, {"whole tumour": 1, "tumour core": 2, "enhancing": 3}))
    assert np.array_equal(back, labels)


def test_read_maps_chosen_rois_to_chosen_values(tmp_path: Path):
    series = _series(tmp_path / "ct")
    labels = _labels()
    path = write_rtstruct(labels, series, NAMES, tmp_path / "rt.dcm")  # an array on the series' grid
    back = sitk.GetArrayFromImage(read_rtstruct(path, series, {"boxes": 7}))
    assert np.array_equal(back, np.where(labels == 2, 7, 0))


def test_any_class_name_becomes_a_valid_roi_name(tmp_path: Path):
    series = _series(tmp_path / "ct")
    name = "Leber \u2013 rechter Lappen\\links\t" + "x" * 80  # non-ASCII, the value separator, a tab, too long
    path = write_rtstruct(_labels(), series, {1: name}, tmp_path / "rt.dcm")  # strict pydicom: valid values
    (roi_name,) = roi_names(pydicom.dcmread(path))
    assert roi_name.startswith("Leber \u2013 rechter Lappen/links") and len(roi_name) == 64


def test_label_image_off_the_series_grid_is_refused(tmp_path: Path):
    series = _series(tmp_path / "ct")
    image = _image(_labels(), series)
    image.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="not on the series' grid"):
        write_rtstruct(image, series, NAMES, tmp_path / "rt.dcm")
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]  # nothing half-written


def test_bad_structure_sets_are_one_line_naming_the_file(tmp_path: Path):
    series = _series(tmp_path / "ct")
    path = write_rtstruct(_image(_labels(), series), series, NAMES, tmp_path / "rt.dcm")
    with pytest.raises(UserError, match=r"rt\.dcm: no ROI named 'liver'"):
        read_rtstruct(path, series, {"liver": 1})

    ds = pydicom.dcmread(path)
    ds.StructureSetROISequence[1].ReferencedFrameOfReferenceUID = generate_uid()
    with pytest.raises(UserError, match="ROI 'boxes' is in frame of reference"):
        read_rtstruct(ds, series)

    other = _series(tmp_path / "other")  # same grid, slices elsewhere: move the series 10 slices along its normal
    shifted = pydicom.dcmread(path)
    for item in shifted.ROIContourSequence[0].ContourSequence:
        points = np.asarray(item.ContourData, float).reshape(-1, 3) + np.array([0.0, 0.0, 10 * SPACING[2]])
        item.ContourData = [f"{v:.4f}" for v in points.ravel()]
    shifted.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = other.datasets[0].FrameOfReferenceUID
    with pytest.raises(UserError, match="contour .* of ROI 'shell' lies off the series' slices"):
        read_rtstruct(shifted, other, {"shell": 1})

    (tmp_path / "not.dcm").write_bytes(b"not dicom")
    with pytest.raises(UserError, match=r"not\.dcm: not a readable DICOM file"):
        read_rtstruct(tmp_path / "not.dcm", series)
    with pytest.raises(UserError, match="not an RT Structure Set"):
        read_rtstruct(series.datasets[0], series)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dicom3tools' validator reports as errors for a DICOM file (warnings are left out)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian's dicom3tools) is not installed")
def test_the_structure_set_passes_dciodvfy_without_errors(tmp_path: Path):
    series = _series(tmp_path / "ct", OBLIQUE)
    path = write_rtstruct(_image(_labels(), series), series, NAMES, tmp_path / "rt.dcm")
    assert dciodvfy_errors(path) == []
    broken = pydicom.dcmread(path)  # the check can fail: a required attribute removed is reported
    del broken.StructureSetLabel
    broken.save_as(tmp_path / "broken.dcm")
    assert any("StructureSetLabel" in line for line in dciodvfy_errors(tmp_path / "broken.dcm"))


# --- autoseg predict --output-format rtstruct, end to end -------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
def test_predict_writes_a_structure_set_that_fills_back_to_the_nifti_prediction(ct, tmp_path: Path):  # noqa: F811
    pytest.importorskip("highdicom")
    from autoseg.cli import run
    from autoseg.io import read_label

    work, root = ct  # a ct-aniso model and one volume as NIfTI and as an oblique DICOM series (test_dicom_predict)
    assert run(["predict", str(work), str(root / "nifti"), str(tmp_path / "nifti"), "--mirror", "off", "-q"]) == 0
    out = tmp_path / "rt"
    assert run(["predict", str(work), str(root / "dicom"), str(out), "--output-format", "rtstruct",
                "--mirror", "off", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dicom.rtstruct.dcm"]
    want, _ = read_label(tmp_path / "nifti" / "case.nii.gz")
    series = find_series(root / "dicom").series[0]
    ds = pydicom.dcmread(out / "dicom.rtstruct.dcm")
    assert ds.StudyInstanceUID == series.datasets[0].StudyInstanceUID and roi_names(ds) == ["liver", "tumour"]
    got = sitk.GetArrayFromImage(read_rtstruct(ds, series, {"liver": 1, "tumour": 2}))
    for value in (1, 2):
        if (want == value).any():
            assert _dice(want == value, got == value) >= 0.95
    np.testing.assert_array_equal(got, want)  # measured: voxel for voxel
    if shutil.which("dciodvfy") is not None:
        assert dciodvfy_errors(out / "dicom.rtstruct.dcm") == []
