"""Export a bundle's networks for deployment outside autoseg: ONNX (any runtime) or TorchScript (libtorch).

Each fold's network becomes one file that maps a preprocessed batch ``(N, C, *spatial)`` (float32,
normalized, at the configuration's spacing; spatial sizes are dynamic, multiples of the network's
stride, e.g. the patch size) to logits ``(N, K, *spatial)``. A Mask R-CNN fold (family ``maskrcnn``, ONNX only) maps one
preprocessed 2D image ``(C, Y, X)`` to its detections (boxes, labels, scores, masks) instead. What surrounds the network in
:mod:`autoseg.predict` goes beside it as JSON, for the deployment to reproduce::

    DIR/plans.json           axis order, the configuration's spacing, normalization (ct statistics filled),
                             resampling, patch size, mirror axes
    DIR/postprocessing.json  the rules applied to the label map
    DIR/export.json          the files, their inputs and outputs, the pipeline steps and the parity results
    DIR/README.md            the model card

Every exported file is checked against PyTorch on random input of another size than the one traced
(so the dynamic axes are exercised): the largest absolute difference of the logits must stay within
:data:`PARITY_TOL`. ONNX needs the optional ``onnx`` and ``onnxruntime`` packages (``pip install
'autoseg[onnx]'``).

>>> export_bundle("model.autoseg", onnx_dir="onnx")          # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from autoseg.artifacts import dumps_json, header
from autoseg.errors import UserError

PARITY_TOL = 1e-4
DETECTION_OUTPUTS = ["boxes", "labels", "scores", "masks"]
DETECTION_STEPS = [
    "per fold, the detector on one preprocessed 2D image (C, Y, X) (its own padding to the network's stride): boxes "
    "(N, 4) x1 y1 x2 y2 in pixels, labels (N,), scores (N,), masks (N, 1, Y, X) soft",
    "label map: per class the highest score x mask of its detections, background 1 minus the highest; the sliding "
    "window, fold mean, restore and argmax as for the other families (steps above)",
    "instance map: the folds' detections merged by mask voting (autoseg.nets.maskrcnn.vote_instances: IoU > 0.5 "
    "within a class, summed score / folds >= 0.5, mean mask > 0.5), painted by descending score, restored with "
    "nearest neighbour, each object kept where the label map has its class",
]
PIPELINE = [
    "read the channels as (C, *spatial) in the order of plans.json channel_names",
    "transpose the spatial axes by plans.json axis_order",
    "crop to the non-zero bounding box of all channels",
    "normalize each channel as the configuration's normalization says",
    "resample to the configuration's spacing (resampling: order, separate z for anisotropic data)",
    "sliding window with tiles of patch_size (overlap 0.5): each tile's softmax (mean over the optional flips of "
    "mirror_axes) times a Gaussian weight, divided per voxel by the sum of the weights of the tiles over it; "
    "mean over the folds",
    "undo resampling, cropping and transposition; with several configurations (manifest ensemble) sum their "
    "maps in that order; if the model's postprocessing.json rules (key: configurations joined by '+') start with "
    "a class_weights rule, multiply each of its classes' summed map by its factor; argmax; apply the other rules "
    "in order",
]
# a region model (output "activation": "sigmoid"): the same steps with each output's own sigmoid for the softmax,
# and the label map painted from the regions instead of the argmax
REGION_STEPS = {
    5: "sliding window with tiles of patch_size (overlap 0.5): each tile's sigmoid per output (one output per region; "
       "mean over the optional flips of mirror_axes) times a Gaussian weight, divided per voxel by the sum of the "
       "weights of the tiles over it; mean over the folds",
    6: "undo resampling, cropping and transposition (0 outside the crop); with several configurations (manifest "
       "ensemble) sum their maps in that order; for each region i in output order, where its summed map exceeds "
       "0.5 times the number of configurations, write the label value regions_class_order[i] (later regions over "
       "earlier); apply the postprocessing.json rules of the model (key: configurations joined by '+')",
}


def _regions(plans) -> dict:
    """The region definition an exported region model needs: each output's name and values, the paint order."""
    from autoseg.schema.labels import regions_of

    return {"outputs": [{"name": n, "values": list(v)} for n, v in regions_of(plans.labels).items()],
            "regions_class_order": list(plans.regions_class_order)}


def pipeline(plans) -> list[str]:
    """The steps that turn an exported network's logits into the model's label map, for this model's outputs."""
    return [REGION_STEPS.get(i, step) for i, step in enumerate(PIPELINE)] if plans.regions else list(PIPELINE)


def _missing(what: str) -> UserError:
    return UserError(f"autoseg export: {what} is not installed; `pip install 'autoseg[onnx]'` "
                     "(or `pip install onnx onnxruntime`), or use --torchscript DIR, or --no-check to skip the check")


def _parity_shape(patch: list[int], strides: list[list[int]]) -> list[int]:
    """The patch size grown by one total stride per axis: a size the network takes, not the traced one."""
    total = np.prod(np.asarray(strides), axis=0).astype(int).tolist()
    return [p + t for p, t in zip(patch, total)]


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    spatial = {i: f"spatial_{i - 2}" for i in range(2, example.ndim)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch", **spatial}, "logits": {0: "batch", **spatial}},
                              opset_version=17, dynamo=False)
    except ImportError as e:
        raise _missing(f"a package torch.onnx needs ({e.name or e})") from e


def _onnx_diff(path: Path, x: torch.Tensor, reference: np.ndarray) -> float:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise _missing("onnxruntime") from e
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(["logits"], {"image": x.numpy()})[0]
    return float(np.abs(out - reference).max())


def _export_detector(net: torch.nn.Module, cfg, in_channels: int, path: Path, check: bool,
                     gen: torch.Generator) -> tuple[dict, str]:
    """A Mask R-CNN fold's detector to ONNX (legacy exporter: torchvision's nms and roi_align map to ONNX's
    NonMaxSuppression and a GridSample), checked on an image of another size than the traced one: same number of
    detections, boxes, scores and masks within :data:`PARITY_TOL` (times the image size for boxes)."""
    detector = net.detector
    spatial = list(cfg.patch_size)
    example = torch.randn(in_channels, *spatial, generator=gen)
    dynamic = {"image": {1: "y", 2: "x"}, "boxes": {0: "n"}, "labels": {0: "n"}, "scores": {0: "n"},
               "masks": {0: "n", 2: "y", 3: "x"}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(detector, ([example],), str(path), input_names=["image"],
                              output_names=DETECTION_OUTPUTS, dynamic_axes=dynamic, opset_version=17, dynamo=False)
    except ImportError as e:
        raise _missing(f"a package torch.onnx needs ({e.name or e})") from e
    entry = {"file": path.name, "input": {"name": "image", "shape": [in_channels, "y", "x"], "dtype": "float32",
                                          "traced_shape": [in_channels, *spatial]},
             "output": {"names": DETECTION_OUTPUTS, "kind": "detections"}}
    line = f"wrote {path}"
    if not check:
        return entry, line
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise _missing("onnxruntime") from e
    x = torch.randn(in_channels, *_parity_shape(spatial, cfg.network.strides), generator=gen)
    with torch.no_grad():
        ref = detector([x])[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(DETECTION_OUTPUTS,
                                                                                  {"image": x.numpy()})
    if got[0].shape[0] != ref["boxes"].shape[0]:
        raise UserError(f"{path}: parity check failed: {got[0].shape[0]} detections, PyTorch {ref['boxes'].shape[0]} "
                        f"on random input {list(x.shape)}; do not deploy this file")
    d = max([float(np.abs(got[0] - ref["boxes"].numpy()).max(initial=0.0)) / max(x.shape[1:])]
            + [float(np.abs(g - ref[k].numpy()).max(initial=0.0)) for g, k in zip(got[2:], ("scores", "masks"))])
    entry["parity"] = {"input_shape": list(x.shape), "max_abs_diff": d, "tolerance": PARITY_TOL,
                       "detections": int(got[0].shape[0])}
    if not d <= PARITY_TOL or not np.array_equal(got[1], ref["labels"].numpy()):
        raise UserError(f"{path}: parity check failed: max |onnx - PyTorch| = {d:.3g} > {PARITY_TOL:g} (or other "
                        f"labels) on random input {list(x.shape)}; do not deploy this file")
    return entry, line + (f" (parity with PyTorch on {list(x.shape)}: {int(got[0].shape[0])} detections, max |diff| "
                          f"{d:.2g} <= {PARITY_TOL:g})")


def _export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
        traced.save(str(path))


def _torchscript_diff(path: Path, x: torch.Tensor, reference: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return float(np.abs(loaded(x).numpy() - reference).max())


FORMATS = {"onnx": (".onnx", _export_onnx, _onnx_diff), "torchscript": (".pt", _export_torchscript, _torchscript_diff)}


def export_bundle(bundle: Path | str, onnx_dir: Path | str | None = None, torchscript_dir: Path | str | None = None,
                  check: bool = True, seed: int = 0) -> list[str]:
    """Export every fold of every configuration in ``bundle`` to ONNX and/or TorchScript; returns one line
    per exported file (with its parity result). A parity failure is a :class:`UserError`."""
    from autoseg.bundle import load_bundle
    from autoseg.bundle.pack import CARD, PLANS_MEMBER, POSTPROCESSING
    from autoseg.nets import build_network

    b = load_bundle(bundle)
    targets = {k: Path(d) for k, d in (("onnx", onnx_dir), ("torchscript", torchscript_dir)) if d is not None}
    if "onnx" in targets and check:
        try:
            import onnxruntime  # noqa: F401  (fail before any work)
        except ImportError as e:
            raise _missing("onnxruntime") from e
    detectors = [n for n in b.weights if b.plans.configurations[n].network.family == "maskrcnn"]
    if detectors and "torchscript" in targets:
        raise UserError(f"{bundle}: configuration {detectors[0]} is a Mask R-CNN, which TorchScript does not trace "
                        "(its detections vary in number); export it with --onnx DIR")
    lines = []
    gen = torch.Generator().manual_seed(seed)
    for kind, out in targets.items():
        suffix, export, diff = FORMATS[kind]
        out.mkdir(parents=True, exist_ok=True)
        models = []
        for name, folds in b.weights.items():
            cfg = b.plans.configurations[name]
            for fold, state in folds.items():
                net = build_network(cfg.network, b.plans.in_channels, b.plans.num_classes, cfg.ndim)
                net.load_state_dict(state)
                net.eval()
                if cfg.network.family == "maskrcnn":
                    entry, line = _export_detector(net, cfg, b.plans.in_channels, out / f"{name}_fold_{fold}{suffix}",
                                                   check, gen)
                    models.append({"configuration": name, "fold": fold, **entry})
                    lines.append(line)
                    continue
                spatial = list(cfg.patch_size)
                example = torch.randn(1, b.plans.in_channels, *spatial, generator=gen)
                path = out / f"{name}_fold_{fold}{suffix}"
                export(net, example, path)
                entry = {"file": path.name, "configuration": name, "fold": fold,
                         "input": {"name": "image", "shape": ["batch", b.plans.in_channels, *[f"spatial_{i}" for i in
                                                                                             range(len(spatial))]],
                                   "dtype": "float32", "traced_shape": [1, b.plans.in_channels, *spatial]},
                         "output": {"name": "logits", "classes": b.plans.num_classes,
                                    "activation": "sigmoid" if b.plans.regions else "softmax"}}
                line = f"wrote {path}"
                if check:
                    x = torch.randn(2, b.plans.in_channels, *_parity_shape(spatial, cfg.network.strides), generator=gen)
                    with torch.no_grad():
                        reference = net(x).numpy()
                    d = diff(path, x, reference)
                    entry["parity"] = {"input_shape": list(x.shape), "max_abs_diff": d, "tolerance": PARITY_TOL}
                    if not d <= PARITY_TOL:
                        raise UserError(f"{path}: parity check failed: max |{kind} - PyTorch| = {d:.3g} > "
                                        f"{PARITY_TOL:g} on random input {list(x.shape)}; do not deploy this file")
                    line += f" (parity with PyTorch on {list(x.shape)}: max |diff| {d:.2g} <= {PARITY_TOL:g})"
                models.append(entry)
                lines.append(line)
        raw = {PLANS_MEMBER: b.plans.to_dict(), POSTPROCESSING: {**header("postprocessing"), "rules": b.postprocessing}}
        for fname, obj in raw.items():
            (out / fname).write_text(dumps_json(obj))
        (out / CARD).write_text(b.card)
        info = {**header("export"), "format": kind, "source": str(bundle), "dataset": b.plans.dataset_name,
                "configuration": b.configuration, "channels": b.plans.channel_names, "labels": b.plans.labels,
                **({"regions": _regions(b.plans)} if b.plans.regions else {}),
                "ensemble": "mean of the folds' probabilities per configuration; sum over the manifest's ensemble",
                "pipeline": pipeline(b.plans) + (DETECTION_STEPS if detectors else []), "models": models}
        (out / "export.json").write_text(dumps_json(info))
        lines.append(f"wrote {out / 'export.json'}, {PLANS_MEMBER}, {POSTPROCESSING} and {CARD} beside the models")
    return lines
