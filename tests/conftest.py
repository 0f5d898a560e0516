"""Shared fixtures: tiny datasets written to disk in the nnU-Net v2 layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from autoseg.io import Geometry, write_image, write_label

# No test may read or write the user's store of step measurements (~/.cache/autoseg): tests plan with stand-in
# measurements, and a store keyed by the real setup handed them to later real plans (found 2026-11-27: a
# module-scoped fixture planned before the function-scoped fixture below had switched the store off, and a
# benchmark then planned vessels from a test's made-up step times). Set here, before any fixture runs.
os.environ["AUTOSEG_CACHE_DIR"] = "off"


def write_tiny_dataset(root: Path, *, cases: int = 3, shape=(12, 16, 16), channels=("MRI",),
                       labels=None, ending: str = ".nii.gz", spacing=(2.0, 1.0, 1.0), seed: int = 0) -> Path:
    """A small valid 3D (or 2D when ``shape`` has two axes) dataset: a bright box labelled 1 (and 2 inside)."""
    labels = labels or {"background": 0, "outer": 1, "inner": 2}
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    ndim = len(shape)
    geom = Geometry(tuple(float(s) for s in spacing[-ndim:]), (0.0,) * ndim, tuple(np.eye(ndim).ravel().tolist()))
    for i in range(cases):
        seg = np.zeros(shape, np.uint8)
        lo = [s // 4 + int(rng.integers(0, 2)) for s in shape]
        hi = [3 * s // 4 for s in shape]
        seg[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
        mid = [(a + b) // 2 for a, b in zip(lo, hi)]
        if max(labels.values()) >= 2:
            seg[tuple(slice(m - 1, m + 2) for m in mid)] = 2
        for c in range(len(channels)):
            img = rng.normal(0, 1, shape).astype(np.float32) + 3 * seg
            write_image(img, geom, root / "imagesTr" / f"case{i:03d}_{c:04d}{ending}")
        write_label(seg, geom, root / "labelsTr" / f"case{i:03d}{ending}")
    meta = {"name": root.name, "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": labels, "numTraining": cases, "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


@pytest.fixture(autouse=True)
def no_measurement_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans in tests measure afresh: a store shared between tests (or with the user's ~/.cache) would hand
    one test's stand-in measurements to the next. Tests of the store set their own folder."""
    monkeypatch.setenv("AUTOSEG_CACHE_DIR", "off")


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans in tests see a quiet machine: the parallel test workers load it, and whether a plan notes other
    processes' load (autoseg.plan.measurements.OthersCpu) must not depend on them. Tests of that set their own."""
    from autoseg.plan import measurements

    monkeypatch.setattr(measurements, "_busy_seconds", lambda: 0.0)
    monkeypatch.setattr(measurements, "_own_seconds", lambda: 0.0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine spinning threads cost seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "Dataset001_Tiny")
