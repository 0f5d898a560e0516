"""Claims: which process holds a piece of work (a training run, a lock), safe between processes and machines
that share a folder.

A claim is a folder of numbered files, one per holder in turn (``000001.json``, ``000002.json``, ...). The
holder is the highest number. Taking a claim creates the next number with ``os.link`` (or ``O_CREAT|O_EXCL``
where a file system has no hard links), which exactly one process wins; a process that finds a higher number
than its own has lost. Nothing is ever overwritten, so no reader sees half a file and two takers of the same
stale claim cannot both win.

The file says who holds it (host, pid and the pid's start time, where the process runs, when it claimed it)
and after how long without a heartbeat it counts as abandoned (``stale_after_s``, the holder's own setting).
Its modification time is the heartbeat: a thread of the holder refreshes it every tenth of that. A claim is
free when its holder released it (``NNNNNN.released``), when its heartbeat is older than ``stale_after_s``
(a killed process, a lost node), or at once when its process is known dead (same machine, pid gone or reused).
Machines must agree on the time within a small share of ``stale_after_s`` (NTP does).

>>> claim = try_claim(folder, stale_after_s=300)   # doctest: +SKIP
>>> if claim is not None:                          # doctest: +SKIP
...     with claim:                                # heartbeat while the work runs; released at the end
...         work(check=claim.check)
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import UserError

DEFAULT_STALE_AFTER_S = 300.0  # a claim without a heartbeat for 5 minutes is taken over
HEARTBEATS_PER_TIMEOUT = 10
CLAIM_SUFFIX, RELEASED_SUFFIX = ".json", ".released"


class ClaimLost(UserError):
    """Another process took this claim over (this one's heartbeat stopped for longer than its timeout: the
    process was paused or its machine cut off); the work it guarded must stop without writing."""


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from Linux's /proc), None where unknown: with the
    pid it names one process even after the pid is reused (a container runs each command under the same pid)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` exists here and, when its start time is known, is the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_started(pid)
    return started is None or now is None or now == started


def this_machine() -> str | None:
    """This kernel's boot id and pid namespace: two processes that share them see each other's pids (a host
    name alone does not say so: containers on two machines may share one)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """What a claim file says, and its heartbeat (the file's modification time)."""

    path: Path
    generation: int
    host: str
    pid: int
    pid_started: int | None
    machine: str | None
    started: float
    stale_after_s: float
    heartbeat: float
    released: bool

    def state(self, now: float | None = None) -> str:
        """``released``, ``dead`` (its process is gone: same machine), ``stale`` (no heartbeat for longer than
        its timeout) or ``live``."""
        now = time.time() if now is None else now
        if self.released:
            return "released"
        if self.machine is not None and self.machine == this_machine() and self.pid > 0 \
                and not alive(self.pid, self.pid_started):
            return "dead"
        return "stale" if now - self.heartbeat > self.stale_after_s else "live"

    def is_live(self, now: float | None = None) -> bool:
        return self.state(now) == "live"

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        ago = f"{max(0.0, now - self.heartbeat):.0f}s ago"
        if self.released:
            return f"{self.host} pid {self.pid} (released {ago})"
        return f"{self.host} pid {self.pid} ({self.state(now)}, heartbeat {ago})"


def _generation(path: Path) -> int | None:
    stem, suffix = path.name.split(".", 1) if "." in path.name else (path.name, "")
    return int(stem) if stem.isdigit() and f".{suffix}" in (CLAIM_SUFFIX, RELEASED_SUFFIX) else None


def _files(folder: Path) -> list[tuple[int, Path]]:
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    return sorted((g, p) for p in entries if (g := _generation(p)) is not None)


def _read(path: Path, generation: int) -> Holder | None:
    try:
        mtime = path.stat().st_mtime
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # created with O_EXCL and not written yet (no hard links): fresh until stale
        info = {}
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
    return Holder(path, generation, str(info.get("host", "?")), int(info.get("pid", -1)), info.get("pid_started"),
                  info.get("machine"), float(info.get("started", mtime)),
                  float(info.get("stale_after_s", DEFAULT_STALE_AFTER_S)), mtime,
                  path.name.endswith(RELEASED_SUFFIX))


def holder(folder: Path | str) -> Holder | None:
    """The latest claim of ``folder`` (live, stale or released), None when it was never claimed."""
    for generation, path in reversed(_files(Path(folder))):
        found = _read(path, generation)
        if found is not None:
            return found
    return None


def try_claim(folder: Path | str, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Claim | None:
    """Take the claim of ``folder`` when it is free (never claimed, released, stale or its process dead); None
    while another process holds it. The returned claim is not yet heartbeating: use it as a context manager
    (or call :meth:`Claim.start`)."""
    if not (stale_after_s > 0):
        raise UserError(f"claim timeout {stale_after_s!r}: expected a positive number of seconds")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    current = holder(folder)
    if current is not None and current.is_live():
        return None
    generation = (current.generation if current is not None else 0) + 1
    path = folder / f"{generation:06d}{CLAIM_SUFFIX}"
    info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_started(os.getpid()),
            "machine": this_machine(), "started": time.time(), "stale_after_s": float(stale_after_s)}
    if not _create(path, json.dumps(info, indent=1).encode()):
        return None  # another process took this number first
    claim = Claim(path, generation, float(stale_after_s))
    if not claim.owned():  # our listing was old: a higher number exists; ours never held anything
        path.unlink(missing_ok=True)
        return None
    for g, older in _files(folder):  # superseded claims: nobody can hold them any more
        if g < generation:
            older.unlink(missing_ok=True)
    return claim


def wait_claim(folder: Path | str, stale_after_s: float = DEFAULT_STALE_AFTER_S, poll_s: float | None = None,
               on_wait=None) -> Claim:
    """Take the claim of ``folder``, waiting while another process holds it (a lock): ``on_wait(holder)`` is
    called once when it has to wait."""
    poll = min(5.0, stale_after_s / HEARTBEATS_PER_TIMEOUT) if poll_s is None else poll_s
    told = False
    while True:
        claim = try_claim(folder, stale_after_s)
        if claim is not None:
            return claim
        if not told and on_wait is not None:
            current = holder(folder)
            if current is not None:
                on_wait(current)
            told = True
        time.sleep(poll)


def _create(path: Path, content: bytes) -> bool:
    """Create ``path`` with ``content`` unless it exists, atomically: written to a temporary name, then hard
    linked (a reader never sees it half written); ``O_CREAT|O_EXCL`` where the file system has no hard links."""
    tmp = path.parent / f"~{path.name}.{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:  # taken; unless NFS retried a link whose reply was lost: then ours has two names
        return os.stat(tmp).st_nlink == 2
    except OSError:  # no hard links here (some FUSE / SMB mounts)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class Claim:
    """A claim this process holds: heartbeat while in use, :meth:`check` to learn that it was lost, released
    at the end (its work is done or given up; the next process may claim it)."""

    def __init__(self, path: Path, generation: int, stale_after_s: float):
        self.path, self.generation, self.stale_after_s = path, generation, stale_after_s
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    def owned(self) -> bool:
        """Whether this claim is still the latest of its folder (no other process took it over)."""
        files = _files(self.folder)
        return bool(files) and files[-1] == (self.generation, self.path)

    def check(self) -> None:
        """Raise :class:`ClaimLost` once the heartbeat found the claim taken over (cheap: call it every step)."""
        if self.lost:
            raise ClaimLost(f"{self.folder}: another worker took this over (this process's heartbeat was older "
                            f"than {self.stale_after_s:.0f}s: was it paused?); stopped without writing")

    def verify(self) -> None:
        """Look now (before a write): raise :class:`ClaimLost` when the claim is no longer this process's."""
        if not self.lost and not self.owned():
            self.lost = True
        self.check()

    def beat(self) -> None:
        now = time.time()
        try:
            os.utime(self.path, (now, now))
        except FileNotFoundError:
            self.lost = True
            return
        if not self.owned():
            self.lost = True

    def start(self) -> Claim:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"heartbeat {self.folder.name}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        interval = self.stale_after_s / HEARTBEATS_PER_TIMEOUT
        while not self._stop.wait(interval) and not self.lost:
            try:
                self.beat()
            except OSError:  # a shared disk hiccup: the next beat tries again
                pass

    def release(self) -> None:
        """Stop the heartbeat and mark the claim released (kept as the last holder's record)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.lost and self.owned():
            try:
                os.rename(self.path, self.path.with_suffix(RELEASED_SUFFIX))
            except FileNotFoundError:
                pass

    def __enter__(self) -> Claim:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.release()
