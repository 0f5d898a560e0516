"""The command line: every command has help, bad input is one line and exit code 2, --debug shows the bug."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_dataset

from autoseg.cli import EXIT_BAD_INPUT, build_parser, run
from autoseg.errors import DatasetError, Problem, UserError
from autoseg.version import __version__

COMMANDS = ["demo", "validate", "fingerprint", "plan", "train", "select", "predict", "evaluate", "synth", "convert-msd",
            "convert-dicom",
            "bundle", "info", "verify", "export", "benchmark", "search-worker", "status"]


def _raising(error: BaseException):
    """A parser factory whose one command raises ``error``: tests run()'s handling apart from any command."""

    def factory() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="autoseg")
        parser.add_argument("--debug", action="store_true")
        sub = parser.add_subparsers(dest="command", required=True)

        def fail(a: argparse.Namespace) -> int:
            raise error

        sub.add_parser("boom").set_defaults(func=fail)
        return parser

    return factory


# --- help and version ------------------------------------------------------------------------------------


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        run(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: autoseg")
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str, capsys):
    with pytest.raises(SystemExit) as e:
        run([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: autoseg {command}")


def test_every_registered_command_is_covered():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        run(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"autoseg {__version__}"


def test_bad_arguments_are_argparse_errors_with_code_2(capsys):
    for argv in ([], ["nonsense"], ["validate"], ["fingerprint", "D", "-j", "0"]):
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2
    assert "usage: autoseg" in capsys.readouterr().err


# --- errors ----------------------------------------------------------------------------------------------


def test_user_error_is_one_line_and_exit_code_2(capsys):
    assert run(["boom"], parser_factory=_raising(UserError("data/x.nii.gz: cannot read image"))) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.err == "autoseg: error: data/x.nii.gz: cannot read image\n" and captured.out == ""


def test_debug_reraises_the_user_error():
    with pytest.raises(UserError, match="cannot read image"):
        run(["--debug", "boom"], parser_factory=_raising(UserError("x: cannot read image")))


def test_dataset_error_prints_each_problem_on_its_own_line(capsys):
    error = DatasetError([Problem("D/a.nii.gz", "file not found"), Problem("D/dataset.json", "not valid JSON")])
    assert run(["boom"], parser_factory=_raising(error)) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.splitlines() == ["D/a.nii.gz: file not found", "D/dataset.json: not valid JSON"]


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run(["boom"], parser_factory=_raising(ZeroDivisionError("a bug")))


def test_interrupt_exits_130(capsys):
    assert run(["boom"], parser_factory=_raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "autoseg: interrupted\n"


def test_real_command_user_error_is_one_line(tmp_path: Path, capsys):
    assert run(["convert-msd", str(tmp_path / "Task00_None"), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"autoseg: error: {tmp_path / 'Task00_None'}: MSD task folder not found\n"
    with pytest.raises(UserError):
        run(["--debug", "convert-msd", str(tmp_path / "Task00_None"), str(tmp_path / "out")])


# --- commands end to end ---------------------------------------------------------------------------------


def test_validate_accepts_a_good_dataset_and_lists_problems_of_a_bad_one(tmp_path: Path, capsys):
    root = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=2)
    assert run(["-q", "validate", str(root), "-j", "1"]) == 0
    assert capsys.readouterr().out == f"{root}: OK\n"
    (root / "labelsTr" / "case001.nii.gz").unlink()
    assert run(["-q", "validate", str(root), "-j", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{root / 'labelsTr' / 'case001.nii.gz'}: missing")
    assert err[-1].startswith("autoseg validate: 1 problem(s) found") and "Traceback" not in "".join(err)


def test_fingerprint_writes_into_the_workdir(tmp_path: Path, capsys):
    root = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=2)
    assert run(["-q", "fingerprint", str(root), "-w", str(tmp_path / "work"), "-j", "1"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'work' / 'fingerprint.json'}\n"
    assert json.loads((tmp_path / "work" / "fingerprint.json").read_text())


def test_convert_msd_command(tmp_path: Path, capsys):
    from test_msd import make_msd_task

    src = make_msd_task(tmp_path / "Task02_Fake", channels=2, cases=2, tests=0)
    assert run(["convert-msd", str(src), str(tmp_path / "out"), "-j", "1"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'out'}\n"
    assert run(["convert-msd", str(src), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(f"autoseg: error: {tmp_path / 'out'}: already exists")


def test_installed_console_script_reports_bad_input_without_traceback(tmp_path: Path):
    script = Path(sys.executable).parent / "autoseg"
    assert script.is_file(), "install the package (pip install -e .) so the console script exists"
    done = subprocess.run([str(script), "convert-msd", "Task00_None", "out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.splitlines() == ["autoseg: error: Task00_None: MSD task folder not found"]
    assert done.stdout == ""


def test_synth_writes_a_dataset_that_validates(tmp_path: Path, capsys):
    out = tmp_path / "Dataset900_Png"
    assert run(["-q", "synth", "png-2d", str(out), "--size", "tiny", "--cases", "2"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert run(["-q", "validate", str(out), "-j", "1"]) == 0


def test_plan_validates_first_and_stops_on_problems(tmp_path: Path, capsys):
    root = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=2)
    work = tmp_path / "work"
    assert run(["-q", "plan", str(root), "-w", str(work), "-j", "1"]) == 0
    assert (work / "fingerprint.json").is_file()
    capsys.readouterr()
    (root / "labelsTr" / "case000.nii.gz").write_bytes(b"broken")
    assert run(["-q", "plan", str(root), "-w", str(tmp_path / "work2"), "-j", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith(str(root)) for line in err)
    assert not (tmp_path / "work2" / "fingerprint.json").exists()


def test_a_re_plan_reads_back_this_machines_step_measurements(tmp_path: Path, capsys, monkeypatch):
    """The second plan of the same data on the same machine times nothing and plans the same; --remeasure
    times everything again."""
    from autoseg.plan import make as make_module

    monkeypatch.setenv("AUTOSEG_CACHE_DIR", str(tmp_path / "store"))
    monkeypatch.setattr(make_module.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    root = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=2)
    work = tmp_path / "work"
    args = ["-q", "plan", str(root), "-w", str(work), "-j", "1", "--budget", "5m", "--device", "cpu"]
    assert run(args) == 0
    first = json.loads((work / "plans.json").read_text())
    assert "planning reused" not in capsys.readouterr().out and first["measurements"]["measured"] > 0
    assert run(args + ["--replan"]) == 0
    assert "planning reused" in capsys.readouterr().out
    again = json.loads((work / "plans.json").read_text())
    assert again["measurements"] == {"reused": first["measurements"]["measured"], "measured": 0}
    assert again["configurations"] == first["configurations"]
    assert run(args + ["--remeasure"]) == 0
    assert "planning reused" not in capsys.readouterr().out
    assert json.loads((work / "plans.json").read_text())["measurements"]["reused"] == 0


def test_the_console_script_leaves_its_work_and_output_whole_when_it_skips_teardown(tmp_path: Path):
    """``exit_now`` ends the process with ``os._exit`` after the exit handlers: what the command printed (to a
    pipe, so buffered) and wrote must all be there, with its exit code."""
    script = Path(sys.executable).parent / "autoseg"
    data = tmp_path / "Dataset001_K"
    subprocess.run([str(script), "-q", "synth", "kidneys-lr", str(data), "--size", "tiny", "--cases", "3"],
                   check=True, timeout=120)
    done = subprocess.run([str(script), "-q", "fingerprint", str(data), "-w", str(tmp_path / "w"), "-j", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fp = json.loads((tmp_path / "w" / "fingerprint.json").read_text())
    assert len(fp["cases"]) == 3 and str(tmp_path / "w" / "fingerprint.json") in done.stdout
