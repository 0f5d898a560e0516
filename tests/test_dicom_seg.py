"""autoseg.dicom.seg: label maps as binary DICOM SEG objects; a region model's overlapping regions as
overlapping segments; read back onto the source grid."""

from __future__ import annotations

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")

from autoseg.dicom.seg import read_seg, read_segment_codes, write_seg  # noqa: E402
from autoseg.dicom.series import find_series  # noqa: E402
from autoseg.errors import UserError  # noqa: E402
from tests.dicom_series import oblique_direction, volume_image, write_series  # noqa: E402


@pytest.fixture
def series(tmp_path):
    image = np.random.default_rng(0).integers(0, 500, (6, 10, 9)).astype(np.float32)
    write_series(volume_image(image, direction=oblique_direction(35)), tmp_path / "mr", modality="MR")
    return find_series(tmp_path / "mr").series[0]


def test_regions_are_overlapping_segments_each_the_union_of_its_values(series, tmp_path):
    labels = np.zeros((6, 10, 9), np.uint8)
    labels[1:5, 2:8, 2:7] = 1
    labels[2:4, 3:7, 3:6] = 2
    labels[3, 4:6, 4:5] = 3
    regions = {(1, 2, 3): "whole tumour", (2, 3): "tumour core", (3,): "enhancing"}
    path = write_seg(labels, series, regions, tmp_path / "r.seg.dcm")
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(regions.values())
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    for number, values in enumerate(regions, start=1):
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number])[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), np.isin(labels, values))
    with pytest.raises(UserError, match=rf"^{path}: its segments cannot be read as one label map"):
        read_seg(path, series)


def test_segment_codes_file_is_checked(tmp_path):
    good = tmp_path / "codes.json"
    good.write_text('{"liver": {"type": "SCT:10200004:Liver"}}')
    assert read_segment_codes(good) == {"liver": {"type": ("SCT", "10200004", "Liver")}}
    bad = tmp_path / "bad.json"
    bad.write_text('{"liver": {"type": "Liver"}}')
    with pytest.raises(UserError, match=r"bad.json: liver.type: code 'Liver' is not SCHEME:VALUE:MEANING"):
        read_segment_codes(bad)
