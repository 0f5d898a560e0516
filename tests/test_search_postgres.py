"""The search on a real PostgreSQL server (``pip install 'autoseg[postgres]'``): a throwaway server in a temporary
folder, ``autoseg plan --search --storage postgresql://...``, two ``autoseg search-worker`` processes against it,
every trial recorded once, and ``autoseg train`` starting from the best trial's weights.

The server is PostgreSQL's own binaries (Debian's postgresql package: ``initdb``, ``pg_ctl``), started as the
current user, or as the ``postgres`` (else ``nobody``) user when the tests run as root, which initdb refuses.
The test skips where the binaries or the driver are missing; CI has both.

Trials are real (training and scoring through the engine) but 4 steps long: the study is made with fixed-step
trials, as the journal file's two-worker test in test_search.py does, so no search deadline races the workers.
"""

from __future__ import annotations

import functools
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import write_tiny_dataset

from autoseg.cli import run
from autoseg.fingerprint import extract_fingerprint
from autoseg.status import workdir_status
from autoseg.workdir import Workdir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRIALS = 5


def server_binaries() -> Path | None:
    """The folder with initdb and pg_ctl: on the PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "initdb").is_file() and Path(folder, "pg_ctl").is_file():
            return Path(folder)
    return None


def server_user() -> pwd.struct_passwd | None:
    """Who runs the server: this user, or an unprivileged one when this is root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root with no postgres or nobody user to run the PostgreSQL server as")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'autoseg[postgres]'")
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    user = server_user()
    root = Path(tempfile.mkdtemp(prefix="autoseg-pg-"))
    as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()

    def pg(*args: str, timeout: float = 120) -> None:
        done = subprocess.run([str(a) for a in args], cwd=root, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"}, **as_user)
        assert done.returncode == 0, done.stdout + done.stderr

    try:
        pg(binaries / "initdb", "-D", data, "-U", "autoseg", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg(binaries / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        yield f"postgresql://autoseg@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").is_file():
            pg(binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from autoseg.search import trial
    from autoseg.cli import main

    flags = Path(sys.argv.pop(1))
    train_and_score = trial.TrialRunner._train_and_score

    def both_working(self, cfg, t):
        (flags / str(t.number)).touch()
        started = time.time()
        while len(list(flags.iterdir())) < 2 and time.time() - started < 60:  # the other worker is in a trial too
            time.sleep(0.05)
        return train_and_score(self, cfg, t)

    trial.TrialRunner._train_and_score = both_working
    trial.TrialRunner._measure = lambda self, cfg: (0.01, 2.0 ** 20)  # no timing of candidate networks
    main()
""")


def test_plan_search_and_two_workers_on_postgresql_record_every_trial_once_and_train_starts_from_the_best(
        postgres_url, tmp_path, monkeypatch, capsys):
    import optuna
    from optuna.trial import TrialState
    from test_search import fake_measure, tiny_rules

    from autoseg.search import run as search_run

    ds = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=4, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    work = Workdir(tmp_path / "work")
    # the rules' plan, as `autoseg plan` keeps an existing one made for the same request (no planner timing here)
    plans = replace(tiny_rules(extract_fingerprint(ds, jobs=1)), planner="default", budget_s=60.0)
    work.save_plans(plans)
    monkeypatch.setattr(search_run, "run_search",
                        functools.partial(search_run.run_search, trial_steps=4, measure=fake_measure))
    assert run(["plan", str(ds), "-w", str(work.root), "--search", "--trials", "1", "--budget", "100s", "--storage",
                postgres_url, "--device", "cpu", "--folds", "2", "-j", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "kept existing plans.json" in out and "1 complete" in out, out
    name = work.load_plans().search["study"]

    flags = tmp_path / "flags"
    flags.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(flags), "-q", "search-worker", str(work.root),
                                 "--storage", postgres_url, "--trials", str(TRIALS), "--device", "cpu",
                                 "--workers", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for w in workers:
        stdout, stderr = w.communicate(timeout=300)
        assert w.returncode == 0, stdout + stderr

    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(TRIALS))  # every trial once
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert len({t.user_attrs["pid"] for t in trials[1:]}) == 2  # both workers ran trials
    table = work.search_table.read_text().splitlines()[1:]
    assert sorted(int(row.split(",")[0]) for row in table) == list(range(TRIALS))

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    search = work.load_plans().search
    assert search["storage"] == postgres_url and search["best_trial"] == best.number
    st = workdir_status(work.root)  # autoseg status reads the trials from the study on the server
    assert st.trials_from == f"study {name}" and sorted(t["trial"] for t in st.trials) == list(range(TRIALS))
    checkpoint = work.root / search["warm_start"]["checkpoint"]
    assert checkpoint == work.trial(best.number).final and checkpoint.is_file()
    capsys.readouterr()
    assert run(["train", str(ds), "-w", str(work.root), "--steps", "2", "--workers", "0", "--device", "cpu", "-q"]) == 0
    assert f"3d_fullres fold 0: starting from the weights in {checkpoint}" in capsys.readouterr().err


def test_a_postgresql_url_without_its_server_is_one_line(tmp_path, capsys):
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'autoseg[postgres]'")
    ds = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=2)
    url = f"postgresql://autoseg:secret@127.0.0.1:{free_port()}/postgres"
    assert run(["plan", str(ds), "-w", str(tmp_path / "w"), "--search", "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open the study storage" in err[0] and "secret" not in err[0], err
