"""nnU-Net v2 beside autoseg, for side-by-side benchmarks: its own virtual environment and folders.

nnU-Net pins its own torch and finds data through environment variables, so it lives apart from autoseg:
a virtual environment in ``benchmarks/.venv-nnunet`` (made on first use: ``python -m venv``, then
``pip install torch`` and ``pip install nnunetv2``) and a workspace under ``benchmarks/work/nnunet/<name>``
whose ``raw``, ``preprocessed`` and ``results`` folders the ``nnUNet_*`` variables point to. Both paths
are gitignored. Extra pip arguments (e.g. a CPU-only torch index) come from ``AUTOSEG_NNUNET_PIP_ARGS``.

    ws = Workspace.create("fingerprint")
    ws.add_dataset(Path("benchmarks/work/data/Dataset501_CTAniso"), 501)
    subprocess.run(ws.command("nnUNetv2_extract_fingerprint", "-d", "501", "-np", "2"), env=ws.env())
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv-nnunet"
WORK = BENCH / "work"
PIP_ARGS_ENV = "AUTOSEG_NNUNET_PIP_ARGS"
_RAW_ENTRIES = ("dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs")


def venv_bin(venv: Path = VENV) -> Path:
    return venv / "bin"


def ensure_venv(venv: Path = VENV, python: str = sys.executable) -> Path:
    """The nnU-Net venv's ``bin`` folder; creates the venv and installs nnunetv2 when its commands are missing.

    torch is installed first, on its own, as nnU-Net's README asks, so ``AUTOSEG_NNUNET_PIP_ARGS`` can
    point it at the right wheel index for the machine.
    """
    marker = venv_bin(venv) / "nnUNetv2_extract_fingerprint"
    if marker.exists():
        return venv_bin(venv)
    print(f"installing nnU-Net into {venv} (once; this takes minutes)", file=sys.stderr)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_bin(venv) / "python"), "-m", "pip", "install", *shlex.split(os.environ.get(PIP_ARGS_ENV, ""))]
    subprocess.run([*pip, "torch"], check=True)
    subprocess.run([*pip, "nnunetv2"], check=True)
    if not marker.exists():
        raise RuntimeError(f"pip installed nnunetv2 into {venv} but {marker.name} is missing")
    return venv_bin(venv)


def versions(venv: Path = VENV, packages: tuple[str, ...] = ("nnunetv2", "torch", "numpy", "SimpleITK")
             ) -> dict[str, str]:
    """Installed versions of ``packages`` inside the nnU-Net venv."""
    code = ("import importlib.metadata as m, sys\n"
            "for p in sys.argv[1:]:\n"
            "    try: print(p, m.version(p))\n"
            "    except m.PackageNotFoundError: print(p, 'missing')")
    out = subprocess.run([str(venv_bin(venv) / "python"), "-c", code, *packages], check=True,
                         capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's ``DatasetXXX_Name`` (a prefix like ``Dataset501_`` already on ``name`` is replaced)."""
    name = re.sub(r"^Dataset\d+_", "", name)
    return f"Dataset{dataset_id:03d}_{re.sub(r'[^A-Za-z0-9]+', '', name) or 'Data'}"


@dataclass(frozen=True)
class Workspace:
    """One benchmark's nnU-Net folders (raw, preprocessed, results) and the environment that names them."""

    root: Path
    venv: Path = VENV

    @classmethod
    def create(cls, name: str, work: Path = WORK, venv: Path = VENV) -> Workspace:
        ws = cls(work / "nnunet" / name, venv)
        for folder in (ws.raw, ws.preprocessed, ws.results):
            folder.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def env(self, **extra: str) -> dict[str, str]:
        """The caller's environment plus nnU-Net's three path variables (and ``extra``)."""
        return {**os.environ, "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
                "nnUNet_results": str(self.results), **extra}

    def command(self, tool: str, *args: str) -> list[str]:
        """Argument list for one of nnU-Net's console scripts from the venv."""
        return [str(venv_bin(self.venv) / tool), *map(str, args)]

    def add_dataset(self, source: Path, dataset_id: int, name: str | None = None, copy: bool = False) -> Path:
        """Lay out a dataset in nnU-Net v2 raw layout as ``raw/DatasetXXX_Name``: symlinks to ``source``'s
        dataset.json and image/label folders (copies with ``copy``). An older folder with the same id goes,
        and so does a preprocessed one under another name: nnU-Net refuses two datasets with one id."""
        source = Path(source).resolve()
        folder = dataset_folder_name(dataset_id, name or source.name)
        for old in self.raw.glob(f"Dataset{dataset_id:03d}_*"):
            _remove(old)
        for stale in self.preprocessed.glob(f"Dataset{dataset_id:03d}_*"):
            if stale.name != folder:
                _remove(stale)
        target = self.raw / folder
        target.mkdir(parents=True)
        for entry in _RAW_ENTRIES:
            src = source / entry
            if not src.exists():
                continue
            if not copy:
                (target / entry).symlink_to(src, target_is_directory=src.is_dir())
            elif src.is_dir():
                shutil.copytree(src, target / entry)
            else:
                shutil.copy2(src, target / entry)
        return target

    def fingerprint_file(self, dataset_id: int) -> Path:
        """Where ``nnUNetv2_extract_fingerprint -d ID`` writes its result."""
        (folder,) = self.preprocessed.glob(f"Dataset{dataset_id:03d}_*")
        return folder / "dataset_fingerprint.json"


def _remove(path: Path) -> None:
    """Delete a file, a symlink (not its target) or a folder (its symlinks, not their targets)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
