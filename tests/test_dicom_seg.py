"""autoseg.dicom.seg: label maps as binary DICOM SEG objects; a region model's overlapping regions as
overlapping segments; read back onto the source grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")

from autoseg.dataset import parse_dataset_json  # noqa: E402
from autoseg.dicom.seg import read_seg, read_segment_codes, write_seg  # noqa: E402
from autoseg.dicom.series import find_series  # noqa: E402
from autoseg.errors import UserError  # noqa: E402
from autoseg.schema.selection import Selection  # noqa: E402
from autoseg.select import dataset_segment_codes  # noqa: E402
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


def _dataset(root, **extra):
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": 0,
        "file_ending": ".nii.gz", **extra}))
    return root


def test_dataset_json_segment_codes_are_checked_and_kept_for_the_selection(tmp_path):
    liver = {"category": "SCT:123037004:Anatomical Structure", "type": "SCT:10200004:Liver"}
    good = _dataset(tmp_path / "good", segment_codes={"liver": liver})
    assert parse_dataset_json(good)[1] == []
    assert dataset_segment_codes(good, ["liver", "tumour"]) == {"liver": liver}
    assert dataset_segment_codes(_dataset(tmp_path / "none"), ["liver", "tumour"]) == {}
    typo = _dataset(tmp_path / "typo", segment_codes={"livr": liver})
    dataset, problems = parse_dataset_json(typo)
    assert dataset is None and len(problems) == 1
    assert "segment_codes: 'livr' is not a class of the dataset (its classes: liver, tumour)" in problems[0].message
    bad = _dataset(tmp_path / "bad", segment_codes={"liver": {"type": "10200004"}})
    assert "liver.type: code '10200004' is not SCHEME:VALUE:MEANING" in parse_dataset_json(bad)[1][0].message


def test_selection_keeps_segment_codes_and_reads_files_without_them(tmp_path):
    codes = {"liver": {"type": "SCT:10200004:Liver"}}
    Selection(configuration="3d", segment_codes=codes).save(tmp_path / "s.json")
    assert Selection.load(tmp_path / "s.json").segment_codes == codes
    Selection(configuration="3d").save(tmp_path / "old.json")
    raw = json.loads((tmp_path / "old.json").read_text())
    del raw["segment_codes"]  # a selection.json written before the key
    assert Selection.from_dict(raw).segment_codes == {}
    with pytest.raises(UserError, match=r"segment_codes"):
        Selection.from_dict({**raw, "segment_codes": {"liver": "SCT:10200004:Liver"}})
