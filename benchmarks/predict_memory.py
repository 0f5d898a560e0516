"""Peak memory of ``autoseg predict`` on a 512x512x400 CT-like volume with 8 classes (issue 5, memory bound).

    python benchmarks/predict_memory.py [--storage float16 float32] [--patch 200x256x256] [--shape 400x512x512]

Target: the volume predicted within 8 GB of RAM.

The model: a random-init 8-class U-Net (3 stages, features 4-8-16, one conv per stage and decoder level,
~10 k parameters) with a big patch (200x256x256) so that 2 cores get through the 27 tiles in minutes; one
fold; bf16 autocast + channels-last (what the planner picks on a CPU with bf16 units). The plan's spacing
equals the image's (1.0 x 0.8 x 0.8 mm), so preprocessing does not resample: the preprocessed space is the
original one and every map is full size (the largest case for this volume; with resampling to a coarser
spacing the preprocessed maps shrink). CT normalization with fixed statistics, no cropping (the body fills
the volume's non-zero box). A random network is as heavy as a trained one: memory does not depend on the
weights.

Each variant runs the real command in its own process tree, measured by :mod:`autoseg.benchmark.measure`
(peak PSS of the tree, sampled every 50 ms, and the kernel's peak RSS of the largest process):

- ``autoseg predict WORK IMAGES OUT --mirror off --tile-batch 1 -q`` (the probabilities in float16, the
  default);
- ``--storage float32``: the same through :func:`autoseg.predict.predict` with ``storage="float32"`` (the CLI
  has no flag for it), to show what the float16 buffer saves.

Mirroring is off (it changes time, not memory: flips are computed one after another); ``--tile-batch 1``
because a tile of this patch with its activations is itself ~1 GB (the default, the training batch but at
least 4, would hold four). The input is written once under benchmarks/work/predict_memory/ and reused.
Writes the section "Memory: 512x512x400, 8 classes" of benchmarks/results/predict.md (other sections kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "predict_memory"
RESULTS = BENCH / "results" / "predict.md"
SECTION = "Memory: 512x512x400, 8 classes"
TARGET_MB = 8 * 1024
SPACING = (1.0, 0.8, 0.8)  # z, y, x (mm)
CLASSES = ["background", "body", "liver", "spleen", "kidney_l", "kidney_r", "bone", "lesion"]
FEATURES = [4, 8, 16]


def write_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """A CT-like int16 volume: air outside an elliptic body, organs as ellipsoids of their own HU, noise."""
    from autoseg.io import Geometry, write_image

    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    body = (y[None, :, None] / 0.8) ** 2 + (x[None, None, :] / 0.9) ** 2 <= 1.0  # (1, Y, X)
    vol = np.where(body, np.int16(40), np.int16(-1000)).repeat(shape[0], 0)
    organs = [((0.2, -0.2, 0.3), (0.5, 0.35, 0.35), 60), ((0.1, -0.3, -0.5), (0.3, 0.2, 0.15), 50),
              ((-0.2, 0.3, 0.4), (0.25, 0.12, 0.12), 30), ((-0.2, 0.3, -0.4), (0.25, 0.12, 0.12), 30),
              ((0.0, 0.55, 0.0), (0.9, 0.1, 0.1), 700), ((0.25, -0.15, 0.35), (0.08, 0.08, 0.08), 100)]
    for (cz, cy, cx), (rz, ry, rx), hu in organs:
        inside = (((z[:, None, None] - cz) / rz) ** 2 + ((y[None, :, None] - cy) / ry) ** 2
                  + ((x[None, None, :] - cx) / rx) ** 2) <= 1.0
        vol[inside] = hu
        del inside
    vol += rng.normal(0, 20, shape).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(vol, Geometry(SPACING, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel().tolist())), path)


def write_workdir(work: Path, shape: tuple[int, int, int], patch: list[int]) -> int:
    """plans.json (spacing = the image's) and one random-init fold; returns the network's parameter count."""
    import torch

    from autoseg.checkpoint import save_checkpoint
    from autoseg.nets import build_network
    from autoseg.schema.plans import Augmentation, Configuration, Network, Normalization, Plans, Resampling
    from autoseg.workdir import FINAL, Workdir

    k = [[3, 3, 3]] * len(FEATURES)
    net = Network("unet", FEATURES, k, [[1, 1, 1]] + [[2, 2, 2]] * (len(FEATURES) - 1), [1] * len(FEATURES),
                  decoder_convs=1)
    cfg = Configuration(name="3d_fullres", ndim=3, spacing=list(SPACING), median_shape=list(shape), patch_size=patch,
                        batch_size=2, normalization=[Normalization("ct", False, -1000.0, 1000.0, 0.0, 300.0)],
                        resampling=Resampling(), network=net, augmentation=Augmentation(mirror_axes=[0, 1, 2]),
                        precision="bf16", channels_last=True)
    labels = {n: i for i, n in enumerate(CLASSES)}
    plans = Plans("Dataset900_MemoryCT", "none", "benchmark", {"type": "cpu"}, 0.0, {"3d_fullres": cfg},
                  axis_order=[0, 1, 2], channel_names=["CT"], labels=labels, file_ending=".nii.gz", folds=1,
                  train_runs=[{"configuration": "3d_fullres", "fold": 0, "seconds": 0.0}])
    plans.save(work / "plans.json")
    torch.manual_seed(0)
    model = build_network(net, 1, len(CLASSES), 3)
    folder = Workdir(work).run("3d_fullres", 0).folder
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / FINAL, model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1, {})
    return sum(p.numel() for p in model.parameters())


def command(storage: str, work: Path, images: Path, out: Path) -> list[str]:
    args = ["--mirror", "off", "--tile-batch", "1", "-q"]
    if storage == "float16":
        return [str(Path(sys.executable).parent / "autoseg"), "predict", str(work), str(images), str(out), *args]
    code = ("import sys; from autoseg.predict import predict; "
            "s = predict(sys.argv[1], sys.argv[2], sys.argv[3], mirror='off', tile_batch=1, progress=False, "
            "storage='float32', report_model=print); print(s.mirror); print(f'wrote in {s.seconds:.1f}s')")
    return [sys.executable, "-c", code, str(work), str(images), str(out)]


def update_results(text: str, section: str = SECTION) -> None:
    """Replace one benchmark's section of predict.md (or add it), keeping the others."""
    head = ("# Prediction: autoseg vs nnU-Net, and memory\n\n"
            "Issue 5, Performance. Each section is written by one benchmark in benchmarks/ and rewritten only by it.\n")
    old = RESULTS.read_text() if RESULTS.is_file() else head
    start = old.find(f"\n## {section}\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + 1)
        new = old[:start + 1] + text + (old[end:] if end >= 0 else "")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="400x512x512", help="Z x Y x X (default %(default)s)")
    p.add_argument("--patch", default="200x256x256", help="patch Z x Y x X (default %(default)s)")
    p.add_argument("--storage", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    p.add_argument("--no-write", action="store_true", help="print the section, do not update predict.md")
    a = p.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    from autoseg.benchmark.measure import machine, measure
    from autoseg.sliding_window import count_tiles

    shape = tuple(int(v) for v in a.shape.split("x"))
    patch = [int(v) for v in a.patch.split("x")]
    images = WORK / f"images_{a.shape}"
    image = images / "ct_0000.nii.gz"
    if not image.is_file():
        t = time.perf_counter()
        write_volume(image, shape)
        print(f"wrote {image} in {time.perf_counter() - t:.0f}s", flush=True)
    work = WORK / "work"
    params = write_workdir(work, shape, patch)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    rows, logs = [], []
    for storage in a.storage:
        out = WORK / f"out_{storage}"
        log = WORK / f"{storage}.log"
        load = os.getloadavg()[0]
        m = measure(command(storage, work, images, out), env=env, log=log)
        text = log.read_text(errors="replace")
        print(f"{storage}: {m.wall_s:.0f}s, peak PSS {m.peak_pss_mb:.0f} MB, largest process {m.max_process_mb:.0f} MB,"
              f" exit {m.returncode}", flush=True)
        if m.returncode:
            print(text[-3000:], file=sys.stderr)
            return 1
        rows.append((storage, m, load))
        logs.append(next((ln for ln in text.splitlines() if "probabilities" in ln), "").strip())
    voxels = int(np.prod(shape))
    maps_mb = {s: len(CLASSES) * voxels * (2 if s == "float16" else 4) / 2**20 for s in ("float16", "float32")}
    lines = [f"## {SECTION}", "",
             "Generated by `benchmarks/predict_memory.py`: one CT-like volume of "
             f"{'x'.join(map(str, shape[::-1]))} voxels (X x Y x Z; int16, .nii.gz), {len(CLASSES)} classes, "
             f"predicted by `autoseg predict` from a workdir: a random-init U-Net (features "
             f"{'-'.join(map(str, FEATURES))}, {params / 1e3:.1f} k parameters), patch {'x'.join(map(str, patch))}, "
             f"{count_tiles(shape, patch, 3)} tiles at overlap 0.5, one fold, bf16 autocast + channels-last, "
             "`--mirror off --tile-batch 1`. The plan's spacing is the image's (1.0 x 0.8 x 0.8 mm): no "
             "resampling, so every map is full size in the preprocessed space. Memory of the whole process tree "
             "(`autoseg.benchmark.measure`): peak PSS sampled every 50 ms, and the kernel's peak RSS of the "
             "largest process.", "", "### Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += ["", "| probabilities stored as | command | wall s | CPU s | peak PSS MB | peak RSS MB (largest process) "
              "| one K-map buffer MB | load avg (1 min) before |", "|---|---|---|---|---|---|---|---|"]
    for storage, m, load in rows:
        how = "`autoseg predict` (default)" if storage == "float16" else "`predict(..., storage=\"float32\")`"
        lines.append(f"| {storage} | {how} | {m.wall_s:.0f} | {m.cpu_s:.0f} | {m.peak_pss_mb:.0f} | "
                     f"{m.max_process_mb:.0f} | {maps_mb[storage]:.0f} | {load:.1f} |")
    lines += [""]
    for storage, m, _ in rows:
        verdict = "met" if max(m.peak_pss_mb, m.max_process_mb) <= TARGET_MB else "**NOT met**"
        lines.append(f"- {storage}: peak {max(m.peak_pss_mb, m.max_process_mb) / 1024:.2f} GiB; target <= 8 GiB: "
                     f"{verdict}")
    lines += [f"- what the command printed: {log}" for log in logs if log]
    lines += ["", "Where the memory goes (float16, this volume): the K-map probability buffer "
              f"({maps_mb['float16']:.0f} MB; float32 {maps_mb['float32']:.0f} MB; several folds add into the same "
              "buffer), the read image and its preprocessed float32 copy (~400 MB each, the read one freed before "
              "the network runs), one tile's activations and its 8-class output, and at export one class restored "
              "to full size with its copy, the running maximum (float32) and the label map."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        update_results(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
