"""Image I/O keeps geometry: what is written is what is read back, and bad files are one clear UserError."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg import io
from autoseg.errors import UserError
from autoseg.io import Geometry, read_image, read_images, read_label, write_image, write_label

MEDICAL = [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"]
METAIMAGE = [".mha", ".mhd"]


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A proper rotation about x, then y, then z (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


ROTATION = tuple(_rotation(0.3, -0.5, 0.9).ravel().tolist())
FLIP = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # x and z reversed
PERMUTED_FLIP = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # axes swapped and reversed, det = -1
# Anisotropic, and exactly representable in float32 (NIfTI stores float32).
SPACING = (3.5, 0.75, 1.25)
ORIGIN = (-120.5, 84.25, 17.0)


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, (5, 6, 7)).astype(np.float32)


def _round_trip(tmp_path: Path, geometry: Geometry, ending: str) -> tuple[np.ndarray, Geometry, np.ndarray]:
    array = _volume()
    write_image(array, geometry, tmp_path / f"img{ending}")
    back, got = read_image(tmp_path / f"img{ending}")
    return array, got, back


# --- geometry --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", MEDICAL)
@pytest.mark.parametrize("direction", [FLIP, PERMUTED_FLIP], ids=["flip", "permuted-flip"])
def test_axis_aligned_geometry_round_trips_exactly_in_every_format(tmp_path: Path, ending: str, direction):
    geometry = Geometry(SPACING, ORIGIN, direction)
    array, got, back = _round_trip(tmp_path, geometry, ending)
    assert got.spacing == geometry.spacing
    assert got.origin == geometry.origin
    assert got.direction == geometry.direction
    assert back.shape == (1, *array.shape)
    np.testing.assert_array_equal(back[0], array)


@pytest.mark.parametrize("ending", METAIMAGE)
def test_oblique_geometry_round_trips_exactly_in_metaimage(tmp_path: Path, ending: str):
    geometry = Geometry((3.3, 0.7, 1.1), (-12.3, 100.7, 33.1), ROTATION)  # not float32-exact on purpose
    array, got, back = _round_trip(tmp_path, geometry, ending)
    assert got == geometry
    np.testing.assert_array_equal(back[0], array)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd"])
def test_oblique_geometry_is_kept_to_the_precision_the_format_stores(tmp_path: Path, ending: str):
    """NIfTI stores the orientation as float32 (sform/quaternion) and NRRD as spacing-scaled direction
    vectors, so a rotation that is not axis-aligned comes back within rounding, not bit for bit; the
    values each format stores directly (NIfTI spacing and origin, NRRD origin) stay exact."""
    geometry = Geometry(SPACING, ORIGIN, ROTATION)
    array, got, back = _round_trip(tmp_path, geometry, ending)
    assert got.origin == geometry.origin
    if ending != ".nrrd":
        assert got.spacing == geometry.spacing
    np.testing.assert_allclose(got.spacing, geometry.spacing, rtol=1e-12)
    np.testing.assert_allclose(got.direction, geometry.direction, rtol=0, atol=1e-6)
    assert geometry.mismatch(got) is None
    np.testing.assert_array_equal(back[0], array)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_2d_medical_image_keeps_its_geometry(tmp_path: Path, ending: str):
    geometry = Geometry((0.5, 2.0), (1.5, -3.0), (-1.0, 0.0, 0.0, 1.0))
    array = np.arange(20, dtype=np.float32).reshape(4, 5)
    write_image(array, geometry, tmp_path / f"slice{ending}")
    back, got = read_image(tmp_path / f"slice{ending}")
    assert got == geometry and back.shape == (1, 4, 5)
    np.testing.assert_array_equal(back[0], array)


def test_spacing_follows_array_axes_and_origin_direction_follow_sitk(tmp_path: Path):
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32))  # numpy (z, y, x)
    img.SetSpacing((0.5, 1.0, 4.0))  # SimpleITK (x, y, z)
    img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "a.mha"))
    array, geometry = read_image(tmp_path / "a.mha")
    assert array.shape == (1, 2, 3, 4) and array.dtype == np.float32
    assert geometry.spacing == (4.0, 1.0, 0.5) and geometry.origin == (1.0, 2.0, 3.0)


def test_geometry_mismatch_names_what_differs():
    a = Geometry(SPACING, ORIGIN, FLIP)
    assert a.mismatch(Geometry(SPACING, (ORIGIN[0] + 1e-6, *ORIGIN[1:]), FLIP)) is None
    assert a.mismatch(Geometry((3.6, 0.75, 1.25), ORIGIN, FLIP)).startswith("spacing")
    assert a.mismatch(Geometry(SPACING, ORIGIN, PERMUTED_FLIP)).startswith("direction")
    assert a.mismatch(Geometry.identity(2)) == "dimensionality 3D vs 2D"
    assert Geometry.from_dict(a.to_dict()) == a


# --- labels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_label_round_trip_small_values_as_uint8(tmp_path: Path, ending: str):
    labels = np.random.default_rng(1).integers(0, 4, (5, 6, 7)).astype(np.int64)
    geometry = Geometry(SPACING, ORIGIN, PERMUTED_FLIP)
    write_label(labels, geometry, tmp_path / f"seg{ending}")
    back, got = read_label(tmp_path / f"seg{ending}")
    assert back.dtype == np.uint8 and got == geometry
    np.testing.assert_array_equal(back, labels)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha", ".tif"])
def test_label_values_above_255_survive(tmp_path: Path, ending: str):
    shape = (5, 6) if ending == ".tif" else (3, 5, 6)
    labels = np.zeros(shape, np.int64)
    labels.flat[:4] = [1, 256, 1000, 70000 if ending != ".tif" else 65535]
    geometry = Geometry.identity(len(shape))
    write_label(labels, geometry, tmp_path / f"seg{ending}")
    back, _ = read_label(tmp_path / f"seg{ending}")
    np.testing.assert_array_equal(back, labels)
    assert np.issubdtype(back.dtype, np.integer)


def test_labels_above_255_refused_for_png(tmp_path: Path):
    with pytest.raises(UserError, match=r"seg\.png: labels above 255 cannot be stored in \.png"):
        write_label(np.array([[0, 300]]), Geometry.identity(2), tmp_path / "seg.png")
    assert list(tmp_path.iterdir()) == []


def test_float_label_with_integer_values_is_read_as_integers(tmp_path: Path):
    write_image(np.array([[[0.0, 1.0], [2.0, 0.0]]], np.float32), Geometry.identity(3), tmp_path / "f.nii.gz")
    back, _ = read_label(tmp_path / "f.nii.gz")
    assert back.dtype == np.uint8 and back.tolist() == [[[0, 1], [2, 0]]]


@pytest.mark.parametrize("values, message", [
    ([0.0, 1.5], "non-integer values"),
    ([0.0, np.nan], "non-integer values"),
    ([0.0, -1.0], "negative values"),
])
def test_bad_label_values_are_a_user_error_naming_the_file(tmp_path: Path, values, message):
    path = tmp_path / "seg.mha"  # not NIfTI: ITK's NIfTI reader turns NaN and Inf into 0
    write_image(np.array([[values]], np.float32), Geometry.identity(3), path)
    with pytest.raises(UserError, match=message) as e:
        read_label(path)
    assert str(e.value).startswith(str(path))


# --- natural 2D images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", [".png", ".bmp", ".tif", ".tiff"])
def test_gray_natural_image_reads_as_one_channel_with_unit_spacing(tmp_path: Path, ending: str):
    gray = np.random.default_rng(2).integers(0, 256, (9, 11)).astype(np.float32)
    write_image(gray, Geometry.identity(2), tmp_path / f"g{ending}")
    back, geometry = read_image(tmp_path / f"g{ending}")
    assert back.shape == (1, 9, 11) and back.dtype == np.float32
    assert geometry == Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    np.testing.assert_array_equal(back[0], gray)


@pytest.mark.parametrize("ending", [".png", ".bmp", ".tif"])
def test_rgb_natural_image_gives_three_channels(tmp_path: Path, ending: str):
    rgb = np.random.default_rng(3).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / f"rgb{ending}"))
    back, geometry = read_image(tmp_path / f"rgb{ending}")
    assert back.shape == (3, 9, 11) and geometry.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(back, np.moveaxis(rgb, -1, 0))


def test_natural_image_spacing_in_the_file_is_ignored(tmp_path: Path):
    img = sitk.GetImageFromArray(np.zeros((4, 5), np.uint8))
    img.SetSpacing((0.25, 0.5))
    sitk.WriteImage(img, str(tmp_path / "scan.tif"))
    assert read_image(tmp_path / "scan.tif")[1] == Geometry.identity(2)


def test_natural_label_reads_first_component_of_rgb(tmp_path: Path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1:3, 1:3] = 2
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "seg.png"))
    back, _ = read_label(tmp_path / "seg.png")
    assert back.shape == (4, 5) and back.max() == 2


# --- channels --------------------------------------------------------------------------------------------


def test_read_images_stacks_channels_first(tmp_path: Path):
    geometry = Geometry(SPACING, ORIGIN, FLIP)
    for c in range(3):
        write_image(_volume(c), geometry, tmp_path / f"c_{c:04d}.nii.gz")
    stacked, got = read_images([tmp_path / f"c_{c:04d}.nii.gz" for c in range(3)])
    assert stacked.shape == (3, 5, 6, 7) and got == geometry
    np.testing.assert_array_equal(stacked[2], _volume(2))


def test_read_images_refuses_channels_of_different_shapes(tmp_path: Path):
    write_image(_volume(), Geometry.identity(3), tmp_path / "a.nii.gz")
    write_image(np.zeros((5, 6, 8), np.float32), Geometry.identity(3), tmp_path / "b.nii.gz")
    with pytest.raises(UserError, match=r"b\.nii\.gz: shape \(5, 6, 8\) differs"):
        read_images([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])


# --- unreadable files ------------------------------------------------------------------------------------


def test_missing_file_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"nothere\.nii\.gz: file not found"):
        read_image(tmp_path / "nothere.nii.gz")
    with pytest.raises(UserError, match="file not found"):
        read_label(tmp_path / "nothere.nii.gz")


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    out = path.with_name("cut_" + path.name)
    out.write_bytes(data[: int(len(data) * keep)])
    return out


@pytest.mark.parametrize("ending", MEDICAL[:4])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_file_is_a_user_error_naming_it(tmp_path: Path, ending: str, keep: float):
    """ITK itself reads a cut NIfTI without complaint (missing voxels become zeros); io must refuse it."""
    big = np.random.default_rng(4).normal(size=(20, 30, 40)).astype(np.float32)
    write_image(big, Geometry.identity(3), tmp_path / f"img{ending}")
    cut = _truncate(tmp_path / f"img{ending}", keep)
    with pytest.raises(UserError) as e:
        read_image(cut)
    message = str(e.value)
    assert message.startswith(f"{cut}: ") and "\n" not in message
    assert "truncated" in message


def test_cut_nifti_header_and_garbage_are_user_errors(tmp_path: Path):
    write_image(_volume(), Geometry.identity(3), tmp_path / "img.nii.gz")
    for keep in (0.02, 0.3):
        with pytest.raises(UserError, match="cut_img"):
            read_image(_truncate(tmp_path / "img.nii.gz", keep))
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"junk\.nii\.gz: cannot read image") as e:
        read_label(tmp_path / "junk.nii.gz")
    assert "\n" not in str(e.value)


def test_nifti_with_trailing_bytes_is_accepted(tmp_path: Path):
    """The integrity check compares against what the header needs; extra bytes after the voxels are harmless."""
    write_image(_volume(), Geometry.identity(3), tmp_path / "img.nii")
    raw = (tmp_path / "img.nii").read_bytes() + b"\0" * 16
    (tmp_path / "pad.nii").write_bytes(raw)
    with gzip.open(tmp_path / "pad.nii.gz", "wb") as f:
        f.write(raw)
    for name in ("pad.nii", "pad.nii.gz"):
        np.testing.assert_array_equal(read_image(tmp_path / name)[0][0], _volume())


# --- atomic writes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", MEDICAL + [".png"])
def test_write_leaves_only_the_final_files(tmp_path: Path, ending: str):
    array = np.zeros((4, 5), np.float32) if ending == ".png" else _volume()
    write_image(array, Geometry.identity(array.ndim), tmp_path / f"img{ending}")
    expected = {f"img{ending}"} | ({"img.raw"} if ending == ".mhd" else set())
    assert {p.name for p in tmp_path.iterdir()} == expected


def test_mhd_header_names_its_final_data_file(tmp_path: Path):
    write_image(_volume(), Geometry.identity(3), tmp_path / "img.mhd")
    assert "ElementDataFile = img.raw" in (tmp_path / "img.mhd").read_text()
    (tmp_path / "moved").mkdir()
    for name in ("img.mhd", "img.raw"):
        (tmp_path / name).rename(tmp_path / "moved" / name)
    np.testing.assert_array_equal(read_image(tmp_path / "moved" / "img.mhd")[0][0], _volume())


def test_written_files_follow_the_umask(tmp_path: Path):
    old = os.umask(0o022)
    try:
        write_image(_volume(), Geometry.identity(3), tmp_path / "img.nii.gz")
    finally:
        os.umask(old)
    assert (tmp_path / "img.nii.gz").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch, error):
    target = tmp_path / "img.nii.gz"
    write_image(_volume(0), Geometry.identity(3), target)
    before = target.read_bytes()

    def half_write(img, name, **kwargs):
        Path(name).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(io.sitk, "WriteImage", half_write)
    with pytest.raises(UserError if isinstance(error, RuntimeError) else KeyboardInterrupt) as e:
        write_image(_volume(1), Geometry.identity(3), target)
    if isinstance(error, RuntimeError):
        assert str(e.value) == f"{target}: cannot write image: disk full"
    assert [p.name for p in tmp_path.iterdir()] == ["img.nii.gz"]
    assert target.read_bytes() == before


def test_unsupported_ending_is_a_user_error_with_nothing_left(tmp_path: Path):
    with pytest.raises(UserError, match=r"img\.xyz: cannot write image"):
        write_image(_volume(), Geometry.identity(3), tmp_path / "img.xyz")
    assert list(tmp_path.iterdir()) == []


def test_write_creates_missing_folders_and_checks_dimensions(tmp_path: Path):
    write_label(np.zeros((2, 3, 4), np.uint8), Geometry.identity(3), tmp_path / "a" / "b" / "seg.nii.gz")
    assert (tmp_path / "a" / "b" / "seg.nii.gz").is_file()
    with pytest.raises(ValueError, match="array is 3D but geometry is 2D"):
        write_image(_volume(), Geometry.identity(2), tmp_path / "x.nii.gz")


def test_file_ending_treats_nii_gz_as_one():
    assert io.file_ending("a/B.NII.GZ") == ".nii.gz"
    assert io.file_ending("x.tiff") == ".tiff" and io.file_ending("x.json") == ".json"
    assert io.is_natural("x.PNG") and not io.is_natural("x.nrrd")
