"""The adversarial catalogue: inputs made to hurt (compression bombs, files that lie about their size,
pickles under harmless names, member paths that escape, flipped bytes, cut files, bundles whose weights or
plans predict could not run), outputs that would replace an input or cannot be written, images no model has
seen, workdirs and datasets broken by hand, and processes that die mid-work. Each is refused fast, in bounded
memory, with exit code 2 and one line naming the file, no traceback, nothing written and no input changed
(:func:`refused` hashes the inputs before and after), or predicted with a warning naming it, or recovered
from by running the same command again.

Every malformed input is built here from tiny generated data; a test per defect found, named for what
it proves. Sizes that would be slow to compute (the sha256 of 1 GiB of zeros) are constants.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import re
import shutil
import socket
import struct
import subprocess
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_tiny_dataset
from test_predict import make_workdir

from autoseg.artifacts import sha256_bytes
from autoseg.bundle import load_bundle, pack_bundle, verify_bundle
from autoseg.bundle.archive import LOCAL_HEADER, MANIFEST, write_archive
from autoseg.cli import run
from autoseg.errors import UserError
from autoseg.io import Geometry, read_image, read_label, write_image, write_label
from autoseg.validate import validate_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MiB = 1 << 20
# 1 GiB of zeros: sha256 and CRC-32, computed once (hashing it takes seconds)
GIB_ZEROS_SHA256 = "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"
GIB_ZEROS_CRC = 0x5B64C2B0


# --- bundles ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A real bundle, as ``pack_bundle`` writes it: a 2D PNG model with two random-init folds."""
    root = tmp_path_factory.mktemp("adversarial")
    _, work, _ = make_workdir(root, "png-2d", "2d", 2, [32, 32], [0, 1], cases=2)
    return pack_bundle(work, root / "model.autoseg")


def contents(path: Path) -> tuple[dict, dict[str, bytes]]:
    """A bundle's manifest (its member table dropped: write_archive recomputes it) and other members."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(members.pop(MANIFEST))
    manifest.pop("members")
    return manifest, members


def zeros_deflated(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of zeros, about 1 KB per MiB, built without compressing them:
    after a full flush the compressor starts afresh, so each MiB compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * mib + c.flush()


def hand_zip(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip written field by field, so that its headers say what a test likes: per member (name, data as
    stored, method 0 stored / 8 deflated, CRC-32, claimed size)."""
    out, central = bytearray(), bytearray()
    for name, stored, method, crc, size in entries:
        n = name.encode()
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 33, crc, len(stored),
                               size, len(n), 0, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 33, crc, len(stored), size, len(n), 0)
        out += n + stored
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def with_member(src: Path, dst: Path, name: str, stream: bytes, crc: int, size: int, sha256: str) -> Path:
    """A copy of bundle ``src`` whose member ``name`` (replaced or added) is the deflate ``stream``, its zip
    headers claiming ``size`` bytes of CRC ``crc`` and the manifest listing it with ``size`` and ``sha256``:
    nothing a reader can check without inflating it says it is wrong."""
    manifest, members = contents(src)
    members.pop(name, None)
    table = {n: {"sha256": sha256_bytes(d), "bytes": len(d)} for n, d in members.items()}
    manifest["members"] = {**table, name: {"sha256": sha256, "bytes": size}}
    listing = json.dumps(manifest).encode()
    entries = [(MANIFEST, listing, 0, zlib.crc32(listing), len(listing))]
    entries += [(n, d, 0, zlib.crc32(d), len(d)) for n, d in members.items()]
    return hand_zip(dst, entries + [(name, stream, 8, crc, size)])


def refused_fast(bundle: Path, capsys) -> tuple[str, float, int]:
    """Run ``autoseg verify``; (its one error line, CPU seconds, peak bytes Python allocated)."""
    tracemalloc.start()
    t0 = time.process_time()
    try:
        code = run(["verify", str(bundle)])
        seconds, peak = time.process_time() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"autoseg: error: {bundle}: "), err
    return err[0], seconds, peak


@pytest.mark.parametrize("member, reason", [
    ("README.md", "more than a bundle's UTF-8 text member may hold"),
    ("weights/2d/fold_0.safetensors", "weights barely compress"),
    ("extra.json", "not part of the bundle format"),
], ids=["card", "weights", "unknown-name"])
def test_a_1_gib_bomb_listed_in_the_manifest_is_refused_in_a_second_and_200_mb(bundle, tmp_path, capsys,
                                                                                member, reason):
    bomb = with_member(bundle, tmp_path / "bomb.autoseg", member, zeros_deflated(1024), GIB_ZEROS_CRC, 1 << 30,
                       GIB_ZEROS_SHA256)
    assert bomb.stat().st_size < 2 * MiB
    line, seconds, peak = refused_fast(bomb, capsys)
    assert member in line and reason in line
    assert seconds < 1.0 and peak < 200 * MiB, (seconds, peak)


def test_a_member_whose_headers_claim_100_bytes_but_inflates_to_256_mib_is_refused_in_a_chunk(bundle, tmp_path,
                                                                                             capsys):
    first = bytes(100)  # what the zip header and the manifest claim: the stream's first 100 bytes
    bomb = with_member(bundle, tmp_path / "liar.autoseg", "README.md", zeros_deflated(256), zlib.crc32(first), 100,
                       sha256_bytes(first))
    line, seconds, peak = refused_fast(bomb, capsys)
    assert "member README.md inflates past the 100 bytes the manifest declares" in line
    assert seconds < 1.0 and peak < 20 * MiB, (seconds, peak)  # one chunk, not the stream


def test_members_sharing_compressed_bytes_are_refused(bundle, tmp_path, capsys):
    """Overlapping members (the same compressed bytes claimed by several directory entries) multiply what a
    small file inflates to: their claimed compressed sizes add up past the file's."""
    manifest, members = contents(bundle)
    write_archive(members, manifest, tmp_path / "ok.autoseg")
    data = bytearray((tmp_path / "ok.autoseg").read_bytes())
    with zipfile.ZipFile(tmp_path / "ok.autoseg") as z:
        weights, directory = z.getinfo("weights/2d/fold_0.safetensors"), z.start_dir
    at = data.find(b"weights/2d/fold_0.safetensors", directory) - 46  # its central directory entry
    assert data[at:at + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, at + 20, weights.compress_size * 40)  # claims 40x its bytes
    bad = tmp_path / "overlap.autoseg"
    bad.write_bytes(bytes(data))
    line, _, _ = refused_fast(bad, capsys)
    assert "claim more compressed bytes than the file" in line


def test_bundles_written_by_pack_bundle_still_verify_and_load(bundle, capsys):
    assert run(["verify", str(bundle)]) == 0
    assert "OK" in capsys.readouterr().out
    assert sorted(load_bundle(bundle).weights["2d"]) == [0, 1]


def test_verify_streams_the_weights_instead_of_holding_them(bundle, monkeypatch):
    """``verify_bundle`` parses the weights' safetensors layout from their header and never asks for
    their bytes whole (the loader does, to build tensors)."""
    import safetensors.torch

    def refuse(*a, **k):
        raise AssertionError("verify built tensors")

    monkeypatch.setattr(safetensors.torch, "load", refuse)
    assert "OK" in verify_bundle(bundle)


PICKLE_0 = pickle.dumps({"x": 1}, protocol=0)  # ASCII text, no protocol header to spot


def _swap(name: str, data: bytes):
    return lambda members: members.__setitem__(name, data)


def _copy_weights(name: str):
    return lambda members: members.__setitem__(name, members["weights/2d/fold_0.safetensors"])


def _bad_offsets(members: dict[str, bytes]) -> None:
    w = members["weights/2d/fold_0.safetensors"]
    n = int.from_bytes(w[:8], "little")
    header = json.loads(w[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [o + 4 for o in header[key]["data_offsets"]]  # over its neighbour's bytes
    text = json.dumps(header).encode()
    members["weights/2d/fold_0.safetensors"] = len(text).to_bytes(8, "little") + text + w[8 + n:]


@pytest.mark.parametrize("change, member, reason", [
    (_swap("extra.json", PICKLE_0), "extra.json", "not part of the bundle format"),
    (_swap("postprocessing.json", PICKLE_0), "postprocessing.json", "is not JSON"),
    (_swap("plans.json", b'["a list"]'), "plans.json", "is not JSON (not a JSON object)"),
    (_swap("README.md", b"\xff\xfe card in UTF-16"), "README.md", "is not UTF-8 text"),
    (_swap("weights/2d/fold_1.safetensors", PICKLE_0), "weights/2d/fold_1.safetensors", "is not safetensors"),
    (_bad_offsets, "weights/2d/fold_0.safetensors", "byte ranges overlap"),
    (_copy_weights("weights/2d/fold_7.safetensors"), "weights/2d/fold_7.safetensors",
     "not a fold the manifest's configurations list"),
], ids=["pickle-as-unknown-json", "pickle-as-json", "json-not-object", "card-not-utf8", "pickle-as-weights",
        "weights-overlapping", "weights-unlisted-fold"])
def test_every_member_parses_as_what_its_name_says_and_unknown_members_are_refused(bundle, tmp_path, capsys,
                                                                                   change, member, reason):
    manifest, members = contents(bundle)
    change(members)
    bad = write_archive(members, manifest, tmp_path / "bad.autoseg")  # listed with the right sha256 and size
    line, _, _ = refused_fast(bad, capsys)
    assert f"member {member}" in line and reason in line
    with pytest.raises(UserError, match=re.escape(reason)):
        load_bundle(bad)


# --- images whose header lies about their size -----------------------------------------------------------


def nifti_claiming(path: Path, dims: tuple[int, int, int]) -> Path:
    """A small valid NIfTI (10^3 int16 voxels, 2.3 KB) whose header then claims ``dims`` voxels."""
    img = sitk.GetImageFromArray(np.zeros((10, 10, 10), np.int16))
    raw = path.with_name("raw.nii")
    sitk.WriteImage(img, str(raw))
    data = bytearray(raw.read_bytes())
    raw.unlink()
    struct.pack_into("<4h", data, 40, 3, *dims)  # dim[0] (rank) and dim[1..3]
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return path


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_a_nifti_claiming_1000_cubed_voxels_is_one_problem_found_before_reading_pixels(tmp_path, monkeypatch,
                                                                                       ending):
    root = write_tiny_dataset(tmp_path / "Dataset001_Bomb", ending=ending)
    bomb = nifti_claiming(root / "imagesTr" / f"case000_0000{ending}", (1000, 1000, 1000))
    assert bomb.stat().st_size < 5000
    pixels_read: list[str] = []
    real = sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage", lambda p, *a, **k: pixels_read.append(str(p)) or real(p, *a, **k))
    t0 = time.process_time()
    problems = validate_dataset(root, jobs=1)
    assert time.process_time() - t0 < 5.0
    mine = [p for p in problems if p.where == str(bomb)]
    assert len(mine) == 1 and "truncated" in mine[0].message and "\n" not in str(mine[0]), problems
    assert str(bomb) not in pixels_read  # no 2 GB buffer allocated for it


def test_an_image_claiming_more_than_the_available_memory_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_SHORT\n"
                     b"ElementDataFile = LOCAL\n" + bytes(64))
    with pytest.raises(UserError, match=r"huge.mha: its header claims 100000x100000x100000 voxels .* more than "
                                        r"the memory available"):
        read_image(path)


def test_read_image_still_reads_a_truthful_nifti(tmp_path):
    path = tmp_path / "ok.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6), np.int16)), str(path))
    arr, _ = read_image(path)
    assert arr.shape == (1, 4, 5, 6) and arr.sum() == 120


# --- a search whose process died, and the loader's teardown ----------------------------------------------


@pytest.fixture
def search_work(tmp_path) -> Path:
    """A planned, preprocessed tiny workdir (test_search's rules) for searches with stand-in trials."""
    from test_search import tiny_rules

    from autoseg.fingerprint import extract_fingerprint
    from autoseg.preprocess import preprocess

    ds = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=4, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    fp = extract_fingerprint(ds, jobs=1)
    plans = tiny_rules(fp)
    plans.save(tmp_path / "work" / "plans.json")
    preprocess(ds, tmp_path / "work", plans, fp, jobs=1)
    return tmp_path / "work"


def _dead_pid() -> tuple[int, int | None]:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid, None


def _reused_pid() -> tuple[int, int | None]:
    """This process's pid, as a container gives every run of a command the same one: with another start time."""
    from autoseg.search.study import process_started

    return os.getpid(), (process_started(os.getpid()) or 0) - 1


@pytest.mark.parametrize("process", [_dead_pid, _reused_pid], ids=["dead-pid", "reused-pid"])
def test_a_trial_left_running_by_a_crashed_search_is_named_failed_and_the_same_command_resumes(search_work, caplog,
                                                                                              process):
    import optuna
    from optuna.trial import TrialState
    from test_search import budget, fake_evaluate, fake_measure

    from autoseg.schema.plans import Plans
    from autoseg.search import run_search
    from autoseg.search import study as studies

    first = run_search(search_work, budget(2), trial_steps=2, progress=False, evaluate=fake_evaluate,
                       measure=fake_measure)
    study = optuna.load_study(study_name=first.study, storage=studies.default_storage(search_work))
    crashed = study.ask()  # what a search killed mid-trial (exit 134) leaves in the study: a RUNNING trial
    pid, started = process()
    for key, value in {"host": socket.gethostname(), "pid": pid, "pid_started": started,
                       "neighbour": "width x2"}.items():
        crashed.set_user_attr(key, value)
    with caplog.at_level(logging.WARNING, logger="autoseg.search.study"):
        again = run_search(search_work, budget(4), trial_steps=2, progress=False, evaluate=fake_evaluate,
                           measure=fake_measure)
    assert f"trial 2 (width x2) was left running by process {pid}" in caplog.text
    states = [t.state for t in optuna.load_study(study_name=first.study,
                                                 storage=studies.default_storage(search_work)).trials]
    assert states[2] == TrialState.FAIL and TrialState.RUNNING not in states and again.ran == 2
    trials = Plans.load(search_work / "plans.json").search["trials"]
    assert trials["complete"] == 4 and trials["failed"] == 1 and trials["running"] == 0


def test_an_orphaned_trial_costs_the_search_budget_at_most_a_trial_not_the_hours_until_it_was_found():
    import datetime

    import optuna
    from optuna.trial import TrialState

    from autoseg.search import study as studies

    study = optuna.create_study()
    study.set_user_attr("trial_s", 60.0)
    now = datetime.datetime.now()
    for orphaned, hours in ((False, 0.01), (True, 5.0)):
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, state=TrialState.FAIL, value=None, datetime_start=now - datetime.timedelta(hours=hours),
            datetime_complete=now, params={}, distributions={}, user_attrs={"orphaned": orphaned},
            system_attrs={}, intermediate_values={}, trial_id=0))
    assert studies.spent_seconds(study) == pytest.approx(36.0 + 60.0)


class _FailsAtStep2:
    """A batch maker whose worker fails at step 2 (a broken cache file, say)."""

    def make(self, step: int) -> dict:
        if step == 2:
            raise ValueError("broken case")
        return {"data": np.zeros((1, 1, 4, 4), np.float32), "target": np.zeros((1, 4, 4), np.int16)}


def test_closing_the_loader_joins_its_workers_even_while_a_traceback_still_holds_its_iterator():
    """A run ending in an exception raised inside the loader keeps the torch iterator alive in the traceback;
    close() must stop and join the workers there and then, not when that traceback goes (in a search: after
    the next trial has started)."""
    from autoseg.loader import PatchLoader

    loader = PatchLoader(_FailsAtStep2(), num_workers=1, prefetch=1, pin_memory=False)
    workers = list(loader._iter._workers)
    try:
        for _ in range(4):
            next(loader)
    except ValueError:
        loader.close()  # the traceback, and with it the iterator, is alive here
        assert not any(w.is_alive() for w in workers)
    else:
        pytest.fail("the worker's error did not reach the training process")


# --- shared: a tiny 3D model, and what every refusal must look like ------------------------------------------


@pytest.fixture(scope="module")
def model3d(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A single-channel 3D NIfTI model (test_predict's hand plans, one random-init fold, no mirroring: fast),
    with its bundle; returns (dataset, workdir, bundle). Its images are 12x16x16 voxels of 2x1x1 mm."""
    from test_predict import hand_plans, save_random_folds

    from autoseg.fingerprint import extract_fingerprint

    root = tmp_path_factory.mktemp("model3d")
    ds = write_tiny_dataset(root / "Dataset001_Tiny", cases=2)
    plans = hand_plans(extract_fingerprint(ds, jobs=1), "3d_fullres", 3, [8, 16, 16], [])
    work = root / "work"
    plans.save(work / "plans.json")
    save_random_folds(work, plans, "3d_fullres", folds=(0,))
    return ds, work, pack_bundle(work, root / "model.autoseg")


def image_of(ds: Path, case: int = 0) -> Path:
    return ds / "imagesTr" / f"case{case:03d}_0000.nii.gz"


def hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file at or under ``paths``: what must not change when a command refuses its input."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])]
    return {str(f): sha256_bytes(f.read_bytes()) for f in files if f.is_file()}


def refused(args: list[str], capsys, names: str, *, inputs: tuple[Path, ...] = (), absent: tuple[Path, ...] = (),
            alone: bool = True) -> str:
    """Run the command ``args``: exit code 2, one error line naming ``names`` (the only line on stderr when
    ``alone``), no traceback, ``inputs`` unchanged, nothing at ``absent``. Returns the error line."""
    before = hashes(*inputs)
    code = run(["-q", *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("autoseg: error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and names in errors[0], err
    assert not alone or err.strip() == errors[0], err
    assert hashes(*inputs) == before
    assert not [p for p in absent if p.exists()]
    return errors[0]


# --- no output ever replaces an input; outputs that cannot be written are one line before any work ----------


@pytest.mark.parametrize("model", ["bundle", "workdir"])
@pytest.mark.parametrize("what", ["folder-into-itself", "file-into-its-folder"])
def test_predicting_a_case_into_its_own_folder_never_replaces_the_input(model3d, tmp_path, capsys, model, what):
    """The model card names single-channel inputs ``case.nii.gz``; predicted into their own folder, the
    prediction ``case.nii.gz`` would replace the image (it did, exit 0)."""
    ds, work, bundle = model3d
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(image_of(ds), folder / "case.nii.gz")
    source = folder if what == "folder-into-itself" else folder / "case.nii.gz"
    line = refused(["predict", str(bundle if model == "bundle" else work), str(source), str(folder)], capsys,
                   str(folder / "case.nii.gz"), inputs=(folder,))
    assert "is an input file" in line and sorted(os.listdir(folder)) == ["case.nii.gz"]


def _under_file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


@pytest.mark.parametrize("command, expected", [
    (lambda ds, work, bundle, f: ["predict", str(bundle), str(image_of(ds)), str(f / "out")], "is a file, not a folder"),
    (lambda ds, work, bundle, f: ["predict", str(bundle), str(image_of(ds)), str(f)], "is not a folder"),
    (lambda ds, work, bundle, f: ["evaluate", str(ds / "labelsTr"), str(ds / "labelsTr"), "-o", str(f / "m.json")],
     "is a file, not a folder"),
    (lambda ds, work, bundle, f: ["evaluate", str(ds / "labelsTr"), str(ds / "labelsTr"), "-o", str(f.parent)],
     "is a folder"),
    (lambda ds, work, bundle, f: ["bundle", str(work), "-o", str(f / "m.autoseg")], "is a file, not a folder"),
    (lambda ds, work, bundle, f: ["bundle", str(work), "-o", str(f.parent)], "is a folder"),
    (lambda ds, work, bundle, f: ["convert-msd", str(f.parent / "Task01"), str(f / "out")], "is a file, not a folder"),
], ids=["predict-under-a-file", "predict-onto-a-file", "evaluate-under-a-file", "evaluate-onto-a-folder",
        "bundle-under-a-file", "bundle-onto-a-folder", "convert-msd-under-a-file"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(model3d, tmp_path, capsys, command, expected):
    """Each ended in a traceback (NotADirectoryError, IsADirectoryError, FileExistsError), exit 1."""
    ds, work, bundle = model3d
    f = _under_file(tmp_path)
    args = command(ds, work, bundle, f)
    line = refused(args, capsys, args[-1], inputs=(ds, work, bundle, f))
    assert expected in line


def test_a_folder_the_process_may_not_write_into_is_one_line_before_any_work(model3d, capsys):
    """/proc refuses new files to every user, root included (a chmod 0o555 folder does not stop root, and CI
    runs as root): the check asks the file system, so it is refused whoever runs it."""
    ds, _, bundle = model3d
    out = Path("/proc") / "autoseg-predictions"
    refused(["predict", str(bundle), str(image_of(ds)), str(out)], capsys, str(out), absent=(out,))


def test_the_write_check_tries_the_file_system_and_leaves_nothing_behind(tmp_path):
    from autoseg.artifacts import check_writable

    check_writable(tmp_path / "new" / "deeper", folder=True)
    check_writable(tmp_path / "m.json")
    assert os.listdir(tmp_path) == []  # the probe file is gone, no folder was made


@pytest.mark.parametrize("command, victim", [
    (lambda ds, work, p: ["evaluate", str(p), str(ds / "labelsTr"), "-o", str(ds / "labelsTr" / "case000.nii.gz")],
     lambda ds, work, p: ds / "labelsTr" / "case000.nii.gz"),
    (lambda ds, work, p: ["evaluate", str(p), str(ds / "labelsTr"), "-o", str(p / "case001.nii.gz")],
     lambda ds, work, p: p / "case001.nii.gz"),
    (lambda ds, work, p: ["evaluate", str(p), str(ds / "labelsTr"), "--dataset-json", str(ds / "dataset.json"),
                          "-o", str(ds / "dataset.json")],
     lambda ds, work, p: ds / "dataset.json"),
    (lambda ds, work, p: ["bundle", str(work), "-o", str(work / "plans.json")], lambda ds, work, p: work / "plans.json"),
    (lambda ds, work, p: ["bundle", str(work), "-o", str(work / "runs/3d_fullres/fold_0/checkpoint_final.pt")],
     lambda ds, work, p: work / "runs/3d_fullres/fold_0/checkpoint_final.pt"),
    (lambda ds, work, p: ["convert-msd", str(ds), str(image_of(ds))], lambda ds, work, p: image_of(ds)),
], ids=["evaluate-onto-a-reference", "evaluate-onto-a-prediction", "evaluate-onto-dataset-json",
        "bundle-onto-plans", "bundle-onto-a-checkpoint", "convert-msd-onto-an-image"])
def test_an_output_that_is_one_of_the_commands_inputs_is_refused(model3d, tmp_path, capsys, command, victim):
    ds, work, _ = model3d
    preds = tmp_path / "preds"
    shutil.copytree(ds / "labelsTr", preds)
    args = command(ds, work, preds)
    refused(args, capsys, str(victim(ds, work, preds)), inputs=(ds, work, preds))
    assert not list(tmp_path.glob("preds/*.csv")) and not list(ds.rglob("*.csv"))


def test_when_no_case_can_be_predicted_the_output_folders_predict_made_are_removed(model3d, tmp_path, capsys):
    ds, _, bundle = model3d
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(np.zeros((16, 16), np.float32), Geometry.identity(2), folder / "flat_0000.nii.gz")  # 2D for 3D
    refused(["predict", str(bundle), str(folder), str(tmp_path / "out" / "deeper")], capsys, "2D image",
            inputs=(folder,), absent=(tmp_path / "out",), alone=False)


# --- predict-time inputs: a bound on memory, warnings for what the model never saw -----------------------------


def test_a_case_whose_resampling_would_exhaust_memory_is_refused_naming_spacing_shape_and_memory(model3d, tmp_path,
                                                                                               capsys):
    """48^3 voxels of 100 mm resampled to 2x1x1 mm: 2400x4800x4800 voxels, hundreds of GiB (it failed
    allocating them, a traceback)."""
    ds, _, bundle = model3d
    folder = tmp_path / "in"
    write_image(np.ones((48, 48, 48), np.float32), Geometry((100.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel())),
                folder / "huge_0000.nii.gz")
    line = refused(["predict", str(bundle), str(folder), str(tmp_path / "out")], capsys, str(folder / "huge"),
                   inputs=(folder,), absent=(tmp_path / "out",), alone=False)
    assert re.search(r"spacing 100x100x100 mm resampled to the model's 2x1x1 mm is 2400x4800x4800 voxels, which "
                     r"needs [\d.]+ GiB of memory \([\d.]+ GiB available\).*--allow-large", line), line


def test_the_memory_bound_is_the_memory_available_and_allow_large_goes_past_it(model3d, tmp_path, capsys,
                                                                             monkeypatch):
    import autoseg.predict_inputs

    ds, _, bundle = model3d
    monkeypatch.setattr(autoseg.predict_inputs, "available_memory", lambda: 1000)  # a machine with 1000 bytes free
    line = refused(["predict", str(bundle), str(image_of(ds)), str(tmp_path / "out")], capsys, str(image_of(ds)),
                   absent=(tmp_path / "out",), alone=False)
    assert "(0.0 GiB available)" in line
    assert run(["-q", "predict", str(bundle), str(image_of(ds)), str(tmp_path / "out"), "--allow-large"]) == 0
    assert os.listdir(tmp_path / "out") == ["case000.nii.gz"]


def _nan_mha(ds: Path, folder: Path) -> Path:
    arr, g = read_image(image_of(ds))
    arr[0, 2, 3, 4:9] = np.nan
    write_image(arr[0], g, folder / "holes_0000.mha")  # MetaImage keeps NaN; NIfTI's reader reads it as 0
    return folder / "holes"


def _nan_nifti(ds: Path, folder: Path) -> Path:
    data = bytearray(gzip.decompress(image_of(ds).read_bytes()))
    offset = int(struct.unpack("<f", data[108:112])[0])
    assert struct.unpack("<h", data[70:72])[0] == 16  # float32 voxels
    data[offset + 400:offset + 404] = struct.pack("<f", float("nan"))
    (folder / "holes_0000.nii.gz").write_bytes(gzip.compress(bytes(data)))
    return folder / "holes"


def _blank(ds: Path, folder: Path) -> Path:
    _, g = read_image(image_of(ds))
    write_image(np.zeros((12, 16, 16), np.float32), g, folder / "blank_0000.nii.gz")
    return folder / "blank"


def _micrometre(ds: Path, folder: Path) -> Path:
    arr, g = read_image(image_of(ds))
    write_image(arr[0], Geometry((0.001,) * 3, g.origin, g.direction), folder / "tiny_0000.nii.gz")
    return folder / "tiny"


@pytest.mark.parametrize("make, words", [
    (_nan_mha, "5 NaN or infinite voxel(s)"),
    (_nan_nifti, "1 NaN or infinite voxel(s) stored in its NIfTI file(s), which the reader turns into 0"),
    (_blank, "channel 0 (MRI) holds one value (0) everywhere: a blank image"),
    (_micrometre, "spacing 0.001x0.001x0.001 mm is far from the model's 2x1x1 mm"),
], ids=["nan", "nan-in-nifti", "blank", "spacing-0.001-mm"])
def test_an_input_the_model_never_saw_is_predicted_with_a_warning_naming_it(model3d, tmp_path, capsys, make,
                                                                            words):
    """Predicted silently before: NaN voxels, a blank image (thousands of organ voxels labelled in it), a
    spacing of 1 um (resampled to one voxel: all background)."""
    from autoseg.predict import predict

    ds, _, bundle = model3d
    folder = tmp_path / "in"
    folder.mkdir()
    where = make(ds, folder)
    assert run(["-q", "predict", str(bundle), str(folder), str(tmp_path / "out")]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("autoseg: warning: ")]
    assert len(warnings) == 1 and f"{where}: {words}" in warnings[0], warnings
    summary = predict(bundle, folder, tmp_path / "again", progress=False)
    assert summary.warnings == {where.name: [warnings[0].removeprefix("autoseg: warning: ")]}


def test_an_ordinary_case_gets_no_warning(model3d, tmp_path, capsys):
    ds, _, bundle = model3d
    assert run(["-q", "predict", str(bundle), str(image_of(ds)), str(tmp_path / "out")]) == 0
    assert "warning" not in capsys.readouterr().err


# --- bundles: verify says OK only to what predict can load and run ---------------------------------------------


def _edit_plans(change):
    def edit(members: dict[str, bytes]) -> None:
        plans = json.loads(members["plans.json"])
        change(plans, plans["configurations"]["3d_fullres"])
        members["plans.json"] = json.dumps(plans).encode()
    return edit


def _edit_weights(change):
    def edit(members: dict[str, bytes]) -> None:
        from safetensors.torch import load, save

        members["weights/3d_fullres/fold_0.safetensors"] = save(change(load(members[
            "weights/3d_fullres/fold_0.safetensors"])))
    return edit


FIRST_CONV = "encoder.stages.0.0.0.weight"  # (4, 1, 3, 3, 3): 4 features from the one channel


def _renamed(w):
    return {("module." if k == FIRST_CONV else "") + k: v for k, v in w.items()}


def _one_dropped(w):
    return {k: v for k, v in w.items() if k != FIRST_CONV}


def _reshaped(w):
    return {**w, FIRST_CONV: w[FIRST_CONV].flatten()}


def _half(w):
    return {**w, FIRST_CONV: w[FIRST_CONV].half()}


@pytest.mark.parametrize("change, words", [
    (_edit_weights(_renamed), f"(missing {FIRST_CONV}; unexpected module.{FIRST_CONV})"),
    (_edit_weights(_one_dropped), f"its tensor names are not the network's (missing {FIRST_CONV})"),
    (_edit_weights(_reshaped), "has shape [108], the network's is [4, 1, 3, 3, 3]"),
    (_edit_weights(_half), "is float16, the network's is float32"),
    (_edit_plans(lambda p, c: c["network"].__setitem__("features", [8, 16])), "the network's is [8, 1, 3, 3, 3]"),
    (_edit_plans(lambda p, c: p["labels"].__setitem__("extra", 3)), "the network's is [4, 4, 1, 1, 1]"),
    (_edit_plans(lambda p, c: c.__setitem__("patch_size", [100000] * 3)), "patch_size: [100000, 100000, 100000] is"),
    (_edit_plans(lambda p, c: c.__setitem__("batch_size", 10 ** 9)), "batch_size: 1000000000, more than a model uses (1024)"),
    (_edit_plans(lambda p, c: p.__setitem__("channel_names", [f"c{i}" for i in range(300)])), "300 input channels"),
    (_edit_plans(lambda p, c: p.__setitem__("labels", {f"l{i}": i for i in range(2000)})), "2000 classes"),
    (_edit_plans(lambda p, c: p.__setitem__("channel_names", [])), "no input channel"),
    (_edit_plans(lambda p, c: p.__setitem__("axis_order", [0, 0, 1])), "axis_order [0, 0, 1] is not a permutation"),
    (_edit_plans(lambda p, c: c["normalization"][0].update(scheme="ct", mean=None)), "ct normalization without"),
], ids=["tensor-renamed", "tensor-missing", "tensor-reshaped", "tensor-float16", "network-wider", "extra-class",
        "patch-100000-cubed", "batch-a-billion", "300-channels", "2000-classes", "no-channel", "axis-order",
        "ct-without-statistics"])
def test_verify_refuses_a_bundle_predict_could_not_run(model3d, tmp_path, capsys, change, words):
    """With the manifest recomputed, each of these verified OK and then failed in predict: load_state_dict's
    RuntimeError, an allocation of the patch, a per-case error for every case."""
    ds, _, bundle = model3d
    manifest, members = contents(bundle)
    change(members)
    bad = write_archive(members, manifest, tmp_path / "bad.autoseg")
    assert words in refused(["verify", str(bad)], capsys, str(bad), inputs=(bad,))
    with pytest.raises(UserError, match=re.escape(words)):
        load_bundle(bad)
    refused(["predict", str(bad), str(image_of(ds)), str(tmp_path / "out")], capsys, str(bad),
            inputs=(bad, ds), absent=(tmp_path / "out",))


def test_the_verify_line_says_the_weights_fit_the_networks_predict_builds(model3d, capsys):
    assert run(["verify", str(model3d[2])]) == 0
    assert "weights fit the networks predict builds" in capsys.readouterr().out


def bundle_with_extra(src: Path, dst: Path, name: str, data: bytes) -> Path:
    """A copy of ``src`` with member ``name`` added verbatim (the zip written field by field, so no library
    normalizes the name) and listed in the manifest with its right sha256 and size."""
    manifest, members = contents(src)
    members[name] = data
    manifest["members"] = {n: {"sha256": sha256_bytes(d), "bytes": len(d)} for n, d in members.items()}
    listing = json.dumps(manifest).encode()
    return hand_zip(dst, [(MANIFEST, listing, 0, zlib.crc32(listing), len(listing))]
                    + [(n, d, 0, zlib.crc32(d), len(d)) for n, d in members.items()])


ESCAPES = "has a path that escapes the bundle"


@pytest.mark.parametrize("name, words", [
    ("../evil.json", ESCAPES), ("weights/../../evil.json", ESCAPES), ("/etc/evil.json", ESCAPES),
    ("weights\\..\\evil.json", ESCAPES), ("C:evil.json", ESCAPES), ("C:/evil.json", ESCAPES),
    ("./evil.json", "not part of the bundle format"), ("weights//evil.json", "not part of the bundle format"),
], ids=["dotdot", "nested-dotdot", "absolute", "backslashes", "drive-relative", "drive-absolute", "dot-slash",
        "double-slash"])
def test_a_member_path_that_escapes_the_bundle_is_refused_in_every_spelling(model3d, tmp_path, capsys, name, words):
    """Names that leave an extraction folder are refused as escaping; the ones a path library folds back in
    (``./x``, ``a//b``) are not names the format has."""
    bad = bundle_with_extra(model3d[2], tmp_path / "slip.autoseg", name, b"{}")
    line = refused(["verify", str(bad)], capsys, str(bad), inputs=(bad,))
    assert (f"member {name!r} {words}" if words == ESCAPES else f"member {name} is {words}") in line
    refused(["predict", str(bad), str(image_of(model3d[0])), str(tmp_path / "out")], capsys, words,
            absent=(tmp_path / "out",))
    assert not (tmp_path / "evil.json").exists() and not Path("/etc/evil.json").exists()


PICKLE_4 = pickle.dumps({"x": 1}, protocol=4)


@pytest.mark.parametrize("name, words", [
    ("weights/3d_fullres/fold_1.pt", "may be a pickle"), ("model.pkl", "may be a pickle"),
    ("weights.bin", "may be a pickle"), ("stats.npy", "may be a pickle"), ("payload", "may be a pickle"),
    ("plans.json", "starts like a pickle"), ("README.md", "starts like a pickle"),
    ("weights/3d_fullres/fold_0.safetensors", "is not safetensors"),
], ids=["pt", "pkl", "bin", "npy", "no-suffix", "as-plans", "as-card", "as-weights"])
def test_a_pickle_is_refused_under_any_name(model3d, tmp_path, capsys, name, words):
    """Added under a name of its own, or in place of a member the format has, listed with its right sha256."""
    manifest, members = contents(model3d[2])
    if name in members:
        members[name] = PICKLE_4
        bad = write_archive(members, manifest, tmp_path / "pickle.autoseg")
    else:
        bad = bundle_with_extra(model3d[2], tmp_path / "pickle.autoseg", name, PICKLE_4)
    assert words in refused(["verify", str(bad)], capsys, str(bad), inputs=(bad,))
    with pytest.raises(UserError):
        load_bundle(bad)


def _flip_at(data: bytearray, where: str, z: zipfile.ZipFile) -> int:
    """The offset of a byte that matters: inside a member's stored data, a name in the central directory, or
    the directory's offset in its end record."""
    if where == "directory-name":
        return data.find(b"plans.json", z.start_dir) + 2
    if where == "end-record":
        return data.rfind(b"PK\x05\x06") + 16  # the central directory's offset
    info = z.getinfo(where)
    return info.header_offset + LOCAL_HEADER + len(info.filename) + info.compress_size // 2


@pytest.mark.parametrize("where", ["manifest.json", "plans.json", "README.md", "weights/3d_fullres/fold_0.safetensors",
                                   "directory-name", "end-record"])
def test_a_flipped_byte_anywhere_that_matters_is_refused(model3d, tmp_path, capsys, where):
    data = bytearray(model3d[2].read_bytes())
    with zipfile.ZipFile(model3d[2]) as z:
        at = _flip_at(data, where, z)
    data[at] ^= 0x55
    bad = tmp_path / "flip.autoseg"
    bad.write_bytes(bytes(data))
    refused(["verify", str(bad)], capsys, str(bad), inputs=(bad,))


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -1, -22], ids=["empty", "10-bytes", "100-bytes", "half",
                                                                  "last-byte-cut", "end-record-cut"])
def test_a_truncated_bundle_is_refused_wherever_it_is_cut(model3d, tmp_path, capsys, keep):
    data = model3d[2].read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) + keep
    bad = tmp_path / "cut.autoseg"
    bad.write_bytes(data[:cut])
    refused(["verify", str(bad)], capsys, str(bad), inputs=(bad,))
    refused(["predict", str(bad), str(image_of(model3d[0])), str(tmp_path / "out")], capsys, str(bad),
            absent=(tmp_path / "out",))


@pytest.mark.parametrize("version, words", [
    ("2.0", "bundle format 2.0 is not supported"), ("0.9", "bundle format 0.9 is not supported"),
    ("x.y", "is not MAJOR.MINOR"), (2, "bundle format 2 is not supported"), (None, "is not MAJOR.MINOR"),
    ("missing", "is not a bundle manifest"),
], ids=["2.0", "0.9", "not-a-version", "integer-2", "null", "missing"])
def test_an_unknown_format_version_is_refused(model3d, tmp_path, capsys, version, words):
    manifest, members = contents(model3d[2])
    if version == "missing":
        manifest.pop("format_version")
    else:
        manifest["format_version"] = version
    bad = write_archive(members, manifest, tmp_path / "version.autoseg")
    assert words in refused(["verify", str(bad)], capsys, str(bad), inputs=(bad,))


def _listing(change):
    def edit(manifest: dict, members: dict[str, bytes]) -> None:
        table = {n: {"sha256": sha256_bytes(d), "bytes": len(d)} for n, d in members.items()}
        change(table)
        manifest["members"] = table
    return edit


@pytest.mark.parametrize("change, words", [
    (_listing(lambda t: t["plans.json"].update(sha256="0" * 64)), "does not match its sha256"),
    (_listing(lambda t: t["plans.json"].update(bytes=t["plans.json"]["bytes"] + 1)), "the manifest says"),
    (_listing(lambda t: t["plans.json"].pop("sha256")), "gives no size and sha256"),
    (_listing(lambda t: t.pop("plans.json")), "not listed in manifest.json"),
    (_listing(lambda t: t.__setitem__("weights/3d_fullres/fold_3.safetensors", t["weights/3d_fullres/fold_0.safetensors"])),
     "listed in manifest.json but not in the file"),
], ids=["wrong-sha256", "wrong-size", "no-sha256", "unlisted", "listed-but-missing"])
def test_a_manifest_whose_table_does_not_match_the_members_is_refused(model3d, tmp_path, capsys, change, words):
    manifest, members = contents(model3d[2])
    change(manifest, members)
    listing = json.dumps(manifest).encode()
    bad = hand_zip(tmp_path / "table.autoseg", [(MANIFEST, listing, 0, zlib.crc32(listing), len(listing))]
                   + [(n, d, 0, zlib.crc32(d), len(d)) for n, d in members.items()])
    assert words in refused(["verify", str(bad)], capsys, str(bad), inputs=(bad,))


# --- workdirs edited or damaged by hand ------------------------------------------------------------------------


def _write(rel: str, text: str):
    return lambda work: (work / rel).write_text(text)


def _edit_workdir_plans(change):
    def edit(work: Path) -> None:
        plans = json.loads((work / "plans.json").read_text())
        change(plans, plans["configurations"]["3d_fullres"])
        (work / "plans.json").write_text(json.dumps(plans))
    return edit


def _truncate(rel: str):
    def cut(work: Path) -> None:
        data = (work / rel).read_bytes()
        (work / rel).write_bytes(data[: len(data) // 2])
    return cut


def _foreign_checkpoint(work: Path) -> None:
    import torch

    torch.save({"weights": torch.zeros(3)}, work / "runs/3d_fullres/fold_0/checkpoint_final.pt")


CKPT = "runs/3d_fullres/fold_0/checkpoint_final.pt"


@pytest.mark.parametrize("damage, file, words", [
    (_write("plans.json", "{"), "plans.json", "not valid JSON"),
    (_write("plans.json", "[]"), "plans.json", "not a plans file"),
    (_edit_workdir_plans(lambda p, c: c["network"].__setitem__("features", [8, 16])), CKPT,
     "its weights do not fit the network plans.json describes"),
    (_edit_workdir_plans(lambda p, c: c.__setitem__("patch_size", [100000] * 3)), "plans.json", "voxels per tile"),
    (_edit_workdir_plans(lambda p, c: p.__setitem__("axis_order", [2, 2, 0])), "plans.json", "not a permutation"),
    (_write("selection.json", "{"), "selection.json", "unreadable"),
    (_write("selection.json", json.dumps({"configuration": "3d_lowres", "ensemble": ["3d_lowres"]})),
     "selection.json", "configuration '3d_lowres' is not in"),
    (_write("selection.json", json.dumps({"configuration": "3d_fullres", "ensemble": ["3d_fullres"],
                                          "postprocessing": [{"rule": "explode"}]})), "selection.json", "rule 0"),
    (_write("fingerprint.json", "{"), "fingerprint.json", "unreadable fingerprint"),
    (_truncate(CKPT), CKPT, "unreadable checkpoint"),
    (_foreign_checkpoint, CKPT, "not an autoseg checkpoint"),
], ids=["plans-not-json", "plans-a-list", "plans-network-edited", "plans-patch-100000-cubed", "plans-axis-order",
        "selection-not-json", "selection-unknown-configuration", "selection-unknown-rule", "fingerprint-not-json",
        "checkpoint-truncated", "checkpoint-foreign"])
def test_a_hand_broken_workdir_is_one_line_naming_the_file(model3d, tmp_path, capsys, damage, file, words):
    """Predict from a workdir whose files were edited or damaged by hand: the network edited after training
    was load_state_dict's traceback, the patch of 100000^3 a MemoryError, an axis order or a post-processing
    rule an error line per case without the file's name."""
    ds, work, _ = model3d
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    damage(copy)
    line = refused(["predict", str(copy), str(image_of(ds)), str(tmp_path / "out")], capsys, str(copy / file),
                   inputs=(copy, ds), absent=(tmp_path / "out",))
    assert words in line


def test_a_missing_preprocessed_case_is_one_line_naming_it(search_work, capsys):
    from autoseg.workdir import Workdir

    work = Workdir(search_work)
    data = next(work.preprocessed("3d_fullres").glob("*_seg.npy"))
    data.with_name(data.name.replace("_seg", "")).unlink()
    refused(["train", str(search_work.parent / "Dataset001_Tiny"), "-w", str(search_work), "--steps", "2",
             "--workers", "0", "--fold", "0", "--device", "cpu"],
            capsys, data.name.replace("_seg", ""), inputs=(work.preprocessed("3d_fullres"),), alone=False)


# --- datasets: one problem line naming the file ---------------------------------------------------------------


def _garbage(root: Path) -> Path:
    image_of(root, 1).write_bytes(b"\x1f\x8b not really gzip")
    return image_of(root, 1)


def _cut(root: Path) -> Path:
    data = image_of(root, 1).read_bytes()
    image_of(root, 1).write_bytes(data[: len(data) // 2])
    return image_of(root, 1)


def _no_label(root: Path) -> Path:
    (root / "labelsTr" / "case001.nii.gz").unlink()
    return root / "labelsTr" / "case001.nii.gz"


def _label_shape(root: Path) -> Path:
    write_label(np.zeros((12, 16, 15), np.uint8), Geometry((2.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel())),
                root / "labelsTr" / "case001.nii.gz")
    return root / "labelsTr" / "case001.nii.gz"


def _undeclared_label(root: Path) -> Path:
    path = root / "labelsTr" / "case001.nii.gz"
    arr, g = read_label(path)
    arr[0, 0, 0] = 9
    write_label(arr, g, path)
    return path


def _dataset_json(root: Path) -> Path:
    (root / "dataset.json").write_text("{ not json")
    return root / "dataset.json"


@pytest.mark.parametrize("damage", [_garbage, _cut, _no_label, _label_shape, _undeclared_label, _dataset_json],
                         ids=["garbage-image", "truncated-image", "missing-label", "label-shape", "undeclared-label",
                              "dataset-json-not-json"])
def test_a_malformed_dataset_is_one_problem_line_naming_the_file(tmp_path, capsys, damage):
    root = write_tiny_dataset(tmp_path / "Dataset001_Bad", cases=2)
    path = damage(root)
    before = hashes(root)
    assert run(["-q", "validate", str(root), "-j", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert len(err) == 2 and err[0].startswith(str(path)) and err[1].startswith("autoseg validate: 1 problem"), err
    assert hashes(root) == before


# --- evaluate: label values dataset.json does not name ---------------------------------------------------------


def test_a_prediction_holding_a_label_value_dataset_json_lacks_is_named_in_a_warning(tmp_path, capsys):
    """Scored without a word before: value 7 counted as background in every class."""
    root = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=2)
    preds = tmp_path / "preds"
    shutil.copytree(root / "labelsTr", preds)
    arr, g = read_label(preds / "case001.nii.gz")
    arr[0, 0, :3] = 7
    write_label(arr, g, preds / "case001.nii.gz")
    assert run(["-q", "evaluate", str(preds), str(root / "labelsTr"), "--dataset-json", str(root / "dataset.json"),
                "-j", "1"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warnings == [f"autoseg evaluate: warning: {preds / 'case001.nii.gz'}: label value(s) 7 not in "
                        f"{root / 'dataset.json'}; those voxels count as background in every class"]


# --- training: the loss row after a resume -----------------------------------------------------------------------


def test_after_a_resume_between_validations_the_loss_row_averages_the_whole_interval(search_work, tmp_path):
    """A run killed at step 3 of a validation interval 2..4 resumed with an empty loss list: its step-4 row
    averaged step 4 alone. The interval's partial sum travels in the checkpoint."""
    import csv
    from dataclasses import replace

    from autoseg.schema.plans import Plans
    from autoseg.train import Trainer

    plans = Plans.load(search_work / "plans.json")
    cfg = plans.configurations["3d_fullres"]
    plans = replace(plans, configurations={"3d_fullres": replace(cfg, schedule=replace(cfg.schedule, val_every=2))})
    rows = {}
    for name, stops in (("whole", [None]), ("resumed", [3, None])):
        work = tmp_path / name
        shutil.copytree(search_work, work, ignore=shutil.ignore_patterns("runs", "search*"))
        for stop in stops:
            Trainer(work, "3d_fullres", 0, plans=plans, steps=4, workers=0, progress=False, device="cpu",
                    stop_after=stop).fit()
        with open(work / "runs/3d_fullres/fold_0/log.csv") as f:
            rows[name] = {r["step"]: float(r["loss"]) for r in csv.DictReader(f)}
    assert list(rows["resumed"]) == ["2", "4"]
    assert rows["resumed"] == pytest.approx(rows["whole"], rel=1e-5)
