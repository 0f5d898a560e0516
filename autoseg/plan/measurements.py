"""This machine's step measurements, kept between plans.

Timing candidate networks is most of what ``autoseg plan`` costs (on a CPU, seconds per real batch), and a
measurement depends only on the machine, the software and the exact setup timed, not on the dataset. So each
one is stored under a key of all of those (the software: torch's version, autoseg's, and a digest of the code
that builds and steps the networks), and a later plan that times the same setup on the same machine
(a re-plan with another budget or fold count, the same data in another workdir, an interrupted plan run again)
reads it back instead of running it. ``autoseg plan --remeasure`` times everything again and replaces what is
stored. A measurement during which other processes used more than ``OTHERS_MAX`` of the machine's CPU time
(Linux: ``/proc/stat`` less this process's own time; elsewhere the load average before and after the plan) is
used for this plan but not stored: it is too slow, and a stored one would shape every later plan for
``MAX_AGE_DAYS`` (found 2026-12-02: a 15-minute plan read back proxy steps timed beside a test run, 2.4x the quiet
machine's, and chose fp32 and a network half as wide).

The store is one JSON file, ``measurements.json`` in the cache folder the caller names (the command line's is
``$AUTOSEG_CACHE_DIR``, default ``~/.cache/autoseg``; ``off`` keeps nothing); without a folder a store still
holds this plan's measurements in memory. Entries older than ``MAX_AGE_DAYS`` are measured again. A missing,
unreadable or unwritable store only means measuring, never an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from autoseg.device import DeviceInfo
from autoseg.plan import compute
from autoseg.plan.compute import StepMeasurement
from autoseg.schema.plans import Network
from autoseg.version import __version__

FORMAT = 2  # 2: measurements checked for other processes' load before they are stored
STORE_FILE = "measurements.json"
MAX_AGE_DAYS = 30
OTHERS_MAX = 0.15  # other processes' share of all CPUs' time during a measurement, above which it is not stored
CLOSE_CALL = 1.2  # fp32 and bf16 are timed again when bf16's speed-up is within this factor of the deciding one
_FIELDS = [f.name for f in fields(StepMeasurement)]


class Store:
    """The measurements of one machine (device, its threads, torch and autoseg versions): read once, written
    once at the end of a plan (merged with what other processes wrote meanwhile)."""

    def __init__(self, device: DeviceInfo, folder: Path | None = None, remeasure: bool = False):
        path = None if folder is None else Path(folder) / STORE_FILE
        self.device, self.path, self.remeasure = device, path, remeasure
        self.entries = {} if remeasure or path is None else _read(path)
        self.new: dict[str, dict] = {}
        self.read: dict[str, dict] = {}  # read back from the store in this plan
        self.hits = self.misses = 0  # read back from earlier plans / measured now
        self.busy: list[float] = []  # others' CPU share during each measurement not stored for it

    def key(self, *what) -> str:
        machine = [FORMAT, __version__, _code_digest(), torch.__version__, self.device.type, self.device.name,
                   self.device.threads]
        return hashlib.sha1(json.dumps([machine, *what], sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> list[StepMeasurement] | None:
        """What was measured for ``key`` (in this plan, or stored before and still fresh), else None. Each setup
        counts once, as read back or as measured, however often the planner asks for it: a re-plan reads back
        exactly the setups the first plan measured."""
        entry = self.new.get(key) or self.read.get(key)
        if entry is None:
            entry = self.entries.get(key)
            if entry is None or time.time() - entry.get("when", 0) > MAX_AGE_DAYS * 86400:
                self.misses += 1
                return None
            self.read[key] = entry
            self.hits += 1  # counted: read back from an earlier plan
        return [StepMeasurement(**{k: m[k] for k in _FIELDS}) for m in entry["m"]]

    def put(self, key: str, measured: list[StepMeasurement], others: float = 0.0) -> None:
        """Keep ``measured`` unless other processes took more than ``OTHERS_MAX`` of the CPUs meanwhile."""
        if others > OTHERS_MAX:
            self.busy.append(others)
            return
        self.new[key] = {"when": time.time(), "m": [asdict(m) for m in measured]}

    def save(self) -> None:
        if self.path is None or not self.new:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**_read(self.path), **self.new}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".measurements.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f)
                os.replace(tmp, self.path)  # atomic: a killed plan leaves the old store, never half a file
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


class OthersCpu:
    """The share of all CPUs' time that other processes used while the block ran (0 when not measurable:
    not Linux, or not a CPU measurement): the busy counters of ``/proc/stat`` less this process's own time.
    Why not the load average: it trails by a minute, so a plan of ten seconds right after, or beside, a burst of
    other work reads it as quiet, or as busy after it ended."""

    def __init__(self, device: str = "cpu"):
        self.on = device == "cpu" and os.path.isfile("/proc/stat")
        self.share = 0.0

    def __enter__(self) -> OthersCpu:
        if self.on:
            self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.on or exc[0] is not None:
            return
        busy0, own0, t0 = self._start
        wall = time.perf_counter() - t0
        others = (_busy_seconds() - busy0) - (_own_seconds() - own0)
        if wall > 0:
            self.share = max(0.0, others / (wall * (os.cpu_count() or 1)))


def _busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # guest time is already counted in user
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The source of what a measurement runs (the networks and the timed step): a change there, even within
    one version, measures afresh."""
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "nets").glob("*.py")) + [root / "plan" / "compute.py"]
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measure(store: Store | None, net: Network, in_ch: int, n_classes: int, ndim: int, patch: list[int], batch: int,
            device: str, precision: str, channels_last: bool, steps: int = 1,
            give_up_s: float | None = None) -> StepMeasurement:
    """``compute.measure_step``, read from ``store`` when this machine timed the same setup before. A setup
    given up on after its warm-up (slower than ``give_up_s``) is not stored: its time is only a bound."""
    what = ["step", asdict(net), in_ch, n_classes, ndim, list(patch), batch, device, precision, channels_last, steps]
    key = store.key(*what) if store else None
    if store and (got := store.get(key)):
        return got[0]
    with OthersCpu(device) as others:
        m, _ = compute.measure_step(net, in_ch, n_classes, ndim, patch, batch, device, precision, channels_last,
                                    steps=steps, give_up_s=give_up_s)
    if store and (give_up_s is None or m.step_time_s <= give_up_s):
        store.put(key, [m], others.share)
    return m


def measure_precisions(store: Store | None, net: Network, in_ch: int, n_classes: int, ndim: int, patch: list[int],
                       batch: int, device: str = "cpu", timed: bool = True, spread: bool = True,
                       decides_at: float | None = None) -> tuple[StepMeasurement, StepMeasurement]:
    """fp32 (with its batch-to-batch gradient spread) and bf16 autocast with channels-last (with its gradient
    error against fp32's, same weights and batch): stored as one entry, as the second needs the first's
    gradient. Each is timed over one step after its warm-up; when bf16's speed-up comes out within
    ``CLOSE_CALL`` of ``decides_at`` (the speed-up the choice hinges on), both are timed once more and the
    faster step of each kept: a single step on a shared machine can be that much slow. Far from it (1.3-1.7x
    on this machine's AMX, against 1.1 to decide) the second steps only cost time: 0.5-1.2 s a plan.
    ``timed=False``: the gradients only, three forward/backward passes (step times unset); ``spread=False``:
    no second batch (the spread is judged elsewhere)."""
    steps = 1 if timed else 0
    what = ["precisions", asdict(net), in_ch, n_classes, ndim, list(patch), batch, device, steps, spread, decides_at]
    key = store.key(*what) if store else None
    if store and (got := store.get(key)):
        return got[0], got[1]

    def both(second_batch: bool) -> tuple[StepMeasurement, StepMeasurement]:
        m32, grad = compute.measure_step(net, in_ch, n_classes, ndim, patch, batch, device, "fp32", False,
                                         steps=steps, second_batch=second_batch)
        m16, _ = compute.measure_step(net, in_ch, n_classes, ndim, patch, batch, device, "bf16", True,
                                      steps=steps, reference_grad=grad)
        return m32, m16

    with OthersCpu(device if timed else "meta") as others:
        m32, m16 = both(spread)
    if timed and decides_at and abs(math.log(m32.step_time_s / m16.step_time_s / decides_at)) < math.log(CLOSE_CALL):
        again32, again16 = both(False)
        m32.step_time_s = min(m32.step_time_s, again32.step_time_s)
        m16.step_time_s = min(m16.step_time_s, again16.step_time_s)
    if store:
        store.put(key, [m32, m16], others.share)
    return m32, m16
