import json

import pytest

from autoseg.crossval import load_splits, make_splits
from autoseg.errors import UserError
from autoseg.workdir import SPLITS_FILE


def test_make_splits_validates_every_case_once():
    ids = [f"c{i}" for i in range(11)]
    splits = make_splits(ids, 5)
    assert len(splits) == 5
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(ids)
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert set(s["train"]) | set(s["val"]) == set(ids)


def test_splits_are_saved_and_reused(tmp_path):
    ids = [f"c{i}" for i in range(6)]
    first = load_splits(tmp_path, ids, 3)
    assert (tmp_path / SPLITS_FILE).is_file()
    assert load_splits(tmp_path, ids, 3) == first


def test_user_splits_final_takes_precedence(tmp_path):
    ids = ["a", "b", "c", "d"]
    mine = [{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a", "b"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(mine))
    assert load_splits(tmp_path, ids, 5) == mine


def test_user_splits_naming_unknown_cases_is_a_clear_error(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"train": ["a", "zzz"], "val": ["b"]}]))
    with pytest.raises(UserError, match="zzz"):
        load_splits(tmp_path, ["a", "b"], 2, f)


def test_too_few_cases():
    with pytest.raises(UserError, match="at least 2"):
        make_splits(["only"], 5)
