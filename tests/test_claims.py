"""Claims between processes (autoseg.claims): one holder at a time, a dead or silent holder's claim taken over,
a taken-over holder told so, and processes racing on claims many times without a double claim or a damaged file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from autoseg import claims
from autoseg.errors import UserError


def test_a_free_claim_is_taken_once_and_free_again_when_released(tmp_path):
    first = claims.try_claim(tmp_path / "run", stale_after_s=60)
    assert first is not None and claims.try_claim(tmp_path / "run", stale_after_s=60) is None
    held = claims.holder(tmp_path / "run")
    assert (held.host, held.pid, held.state()) == (socket.gethostname(), os.getpid(), "live")
    assert held.stale_after_s == 60 and held.pid_started == claims.process_started(os.getpid())
    with first:  # heartbeat, then released
        first.check()
    assert claims.holder(tmp_path / "run").state() == "released"
    second = claims.try_claim(tmp_path / "run", stale_after_s=60)
    assert second is not None and second.generation == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["000002.json"]  # the superseded one is gone
    second.release()


def test_a_claim_without_heartbeat_is_taken_over_after_its_timeout_and_its_holder_learns_it(tmp_path):
    silent = claims.try_claim(tmp_path / "run", stale_after_s=0.3)  # never started: no heartbeat, as if paused
    assert claims.try_claim(tmp_path / "run", stale_after_s=0.3) is None
    time.sleep(0.4)
    assert claims.holder(tmp_path / "run").state() == "stale"
    taker = claims.try_claim(tmp_path / "run", stale_after_s=60)
    assert taker is not None
    with pytest.raises(claims.ClaimLost, match="another worker took this over"):
        silent.verify()
    assert isinstance(claims.ClaimLost("x"), UserError)
    silent.release()  # releasing a lost claim leaves the new holder's alone
    assert claims.holder(tmp_path / "run").generation == taker.generation and claims.holder(tmp_path / "run").is_live()
    taker.release()


def test_a_heartbeat_keeps_a_claim_and_notices_a_takeover(tmp_path):
    with claims.try_claim(tmp_path / "run", stale_after_s=0.3) as held:
        time.sleep(0.6)  # twice its timeout: the heartbeat keeps it live
        assert claims.try_claim(tmp_path / "run", stale_after_s=0.3) is None
        # another machine's process takes it over (as after a network partition)
        (tmp_path / "run" / "000002.json").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        time.sleep(0.1)
        with pytest.raises(claims.ClaimLost):
            held.check()


def test_a_claim_of_a_dead_process_on_this_machine_is_free_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from autoseg import claims; "
                           "claims.try_claim(sys.argv[1], stale_after_s=3600)", str(tmp_path / "run")], timeout=60)
    assert done.returncode == 0
    assert claims.holder(tmp_path / "run").state() == "dead"  # its heartbeat is fresh, its process gone
    assert claims.try_claim(tmp_path / "run", stale_after_s=60) is not None


def test_a_claim_of_another_machine_is_judged_by_its_heartbeat_alone(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "000001.json").write_text(json.dumps({"host": "node7", "pid": 999999, "machine": "another-boot/pid:[1]",
                                                    "started": time.time(), "stale_after_s": 0.5}))
    assert claims.holder(folder).state() == "live" and claims.try_claim(folder) is None
    old = time.time() - 1
    os.utime(folder / "000001.json", (old, old))
    assert claims.holder(folder).state() == "stale"
    assert claims.try_claim(folder).generation == 2


def test_a_bad_timeout_is_refused(tmp_path):
    with pytest.raises(UserError, match="claim timeout"):
        claims.try_claim(tmp_path / "run", stale_after_s=0)


RACER = textwrap.dedent("""
    import os, random, sys, time
    from pathlib import Path
    from autoseg import claims

    root, seconds, me = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    rng = random.Random(me)
    got = doubled = lost = 0
    end = time.time() + seconds
    while time.time() < end:
        folder = root / f"run{rng.randrange(3)}"
        claim = claims.try_claim(folder, stale_after_s=0.5)
        if claim is None:
            time.sleep(rng.random() * 0.002)
            continue
        got += 1
        claim.start()
        try:
            claim.verify()  # as a trainer does before it writes
        except claims.ClaimLost:
            lost += 1
        else:
            try:  # the guarded work: a file only one holder may create
                fd = os.open(folder.parent / (folder.name + ".inside"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                doubled += 1
            else:
                os.close(fd)
                time.sleep(rng.random() * 0.003)
                os.unlink(folder.parent / (folder.name + ".inside"))
        if rng.random() < 0.05:  # gone without releasing, as if killed: taken over once it is stale
            claim._stop.set()
            claim._thread.join()
        else:
            claim.release()
    print(got, doubled, lost)
""")


def test_processes_racing_on_claims_never_hold_one_twice_nor_damage_a_file(tmp_path):
    """Four processes claim three folders for 6 s, each time doing a piece of work only one holder may do; one claim
    in twenty is abandoned without release (as by a killed process) and taken over, contested, once stale."""
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), "6", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append([int(x) for x in out.split()])
    assert sum(r[1] for r in results) == 0, results  # never two holders at once
    got = sum(r[0] for r in results)
    assert got > 100, results  # the race did happen
    generations = 0
    for folder in (tmp_path / "run0", tmp_path / "run1", tmp_path / "run2"):
        names = sorted(p.name for p in folder.iterdir())
        assert len(names) == 1 and not any(n.startswith("~") for n in names), names  # no leftover, no temporary
        json.loads((folder / names[0]).read_text())  # whole
        generations += claims.holder(folder).generation
    assert generations == got  # every claim taken was a new number: no two processes took the same one
