"""Wall time and peak memory of a command *and every process it starts* (Linux, /proc).

A tool that runs a process pool uses the memory of all its processes at once, so the peak of one process
(what ``/usr/bin/time`` or ``ru_maxrss`` report) understates it. :func:`measure` polls the process tree
every ``interval`` seconds (50 ms: the poll costs ~5% of one core) and records the peak of the sum over the
processes alive at that moment. PSS is read less often (every 10 % of the time so far, at most every
``pss_interval``, 0.5 s): reading a process's
``smaps_rollup`` walks its page tables under its memory-map lock, which stalls the page faults of its
threads; read every 50 ms it made ``autoseg plan``'s timed torch steps 1.4-1.8x slower (wall 10.8 vs 7.9 s).

- ``peak_pss_mb``: sum of PSS (proportional set size: a page shared by k processes counts 1/k in each).
  Shared libraries and copy-on-write pages count once: the memory the tree really takes from the machine.
- ``peak_rss_mb``: sum of RSS: shared pages counted in every process that maps them (an upper bound).
- ``max_process_mb``: the largest single process's peak RSS, exact (the kernel's ``ru_maxrss`` from
  ``wait4``: over the command and its reaped descendants), for comparison with ``/usr/bin/time``.
- ``hwm_sum_mb``: each process's own peak RSS (kernel-tracked VmHWM, no sampling miss), summed over all
  processes seen: an upper bound of the RSS sum's peak, as if every process peaked at the same moment.
- ``cpu_s``: CPU time (user + system) of the tree: the work done, whatever else loads the machine.
  Each process counts its last sampled value, so up to ``interval`` per process may be missed
  (``wait4``'s times would count reaped pool workers twice).

The PSS and RSS sums are sampled, so a spike shorter than ``pss_interval`` (PSS) or ``interval`` (RSS, read
from ``statm`` without the page-table walk) can be missed; the per-process peaks cannot.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    peak_pss_mb: float
    peak_rss_mb: float
    max_process_mb: float
    hwm_sum_mb: float  # sum over processes of each one's own peak RSS: an upper bound of peak_rss_mb
    cpu_s: float  # user + system CPU time of the tree, summed over its processes
    processes: int  # distinct processes seen in the tree
    returncode: int


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc/PID/task/*/children (any thread may have started one)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            kids += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    except OSError:
        pass  # the process ended while we looked
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now (walked down from ``root``: cheap enough to poll often)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(_children(pid))
    return found


def _hwm_kb(pid: int) -> int:
    """Peak RSS of ``pid`` so far, as the kernel tracks it (VmHWM); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    utime, stime = stat[stat.rindex(")") + 2:].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def _rss_kb(pid: int) -> int:
    """Resident set size from ``statm``: a counter, no page-table walk (cheap to poll)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass  # the process ended (or is a zombie) between listing and reading
    return rss, pss


def measure(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            interval: float = 0.05, log: Path | None = None, timeout: float | None = None,
            append: bool = False, pss_interval: float = 0.5) -> Measurement:
    """Run ``cmd`` to completion and return its wall time and the peak memory of its process tree.

    With ``timeout`` (seconds), a command still running then is killed with its whole process group and
    its return code is -9. ``append`` adds to ``log`` instead of replacing it.
    """
    out = open(log, "ab" if append else "wb") if log else subprocess.DEVNULL  # noqa: SIM115  (closed below)
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=timeout is not None)
    peak_rss = peak_pss = 0
    next_pss = start
    cpu: dict[int, float] = {}
    hwm: dict[int, int] = {}
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - start > timeout:
                _kill_group(proc.pid)
            pids = process_tree(proc.pid)
            cpu.update((p, max(cpu.get(p, 0.0), _cpu_s(p))) for p in pids)
            hwm.update((p, max(hwm.get(p, 0), _hwm_kb(p))) for p in pids)
            peak_rss = max(peak_rss, sum(_rss_kb(p) for p in pids))
            if time.perf_counter() >= next_pss:
                peak_pss = max(peak_pss, sum(_rss_pss_kb(p)[1] for p in pids))
                now = time.perf_counter()  # every 10 % of the time so far: short commands are sampled too
                next_pss = now + max(interval, min(pss_interval, 0.1 * (now - start)))
            time.sleep(interval)
    finally:
        if log:
            out.close()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(wall, peak_pss / 1024, peak_rss / 1024, usage.ru_maxrss / 1024, sum(hwm.values()) / 1024,
                       sum(cpu.values()), len(cpu), proc.returncode)


def _kill_group(pid: int) -> None:
    """End a command started in its own session, and everything it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def machine() -> dict[str, str]:
    """CPU model, cores, memory, OS and Python: what a reader needs to compare numbers across machines."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal:"))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": f"{os.cpu_count()} ({usable} usable by this process)",
            "memory": f"{mem_kb / 2**20:.1f} GiB", "os": platform.platform(),
            "python": sys.version.split()[0]}
