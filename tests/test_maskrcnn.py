"""Mask R-CNN as a network family: torchvision's compiled ops replaced in pure torch where they cannot load (checked
against brute-force references), the network's training losses and eval output, targets from label maps, and the
folds' mask voting."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from autoseg.nets.maskrcnn import Detection, objects_of, targets_from_labels, vote_instances
from autoseg.schema.plans import Network


@pytest.fixture(scope="module")
def torchvision():
    from autoseg.nets.torchvision_ops import import_torchvision

    try:
        return import_torchvision()
    except ModuleNotFoundError:
        pytest.skip("torchvision is not installed (pip install 'autoseg[instances]')")


def brute_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            ix = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            iy = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            a = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            b = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            if ix * iy / (a + b - ix * iy) > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_matches_a_brute_force_greedy_suppression(torchvision):
    rng = np.random.default_rng(0)
    for n, threshold in ((0, 0.5), (1, 0.5), (60, 0.3), (200, 0.7)):
        xy = rng.uniform(0, 40, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (n, 2))], axis=1)
        scores = rng.permutation(n).astype(np.float64) / max(n, 1)  # distinct: the order is defined
        got = torchvision.ops.nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32),
                                  threshold)
        assert got.dtype == torch.int64
        assert got.tolist() == brute_nms(boxes, scores, threshold)


def _bilinear(img: np.ndarray, y: float, x: float) -> float:
    h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[y0, x0] + (1 - ly) * lx * img[y0, x1] + ly * (1 - lx) * img[y1, x0]
            + ly * lx * img[y1, x1])


def brute_roi_align(features: np.ndarray, rois: np.ndarray, scale: float, out: int, ratio: int, aligned: bool):
    """torchvision's CPU kernel, one sample point at a time."""
    result = np.zeros((len(rois), features.shape[1], out, out))
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois):
        sx, sy = x1 * scale - offset, y1 * scale - offset
        rw, rh = x2 * scale - offset - sx, y2 * scale - offset - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / out, rw / out
        gh = ratio if ratio > 0 else math.ceil(rh / out)
        gw = ratio if ratio > 0 else math.ceil(rw / out)
        for c in range(features.shape[1]):
            for ph in range(out):
                for pw in range(out):
                    total = sum(_bilinear(features[int(b), c], sy + ph * bh + (iy + 0.5) * bh / gh,
                                          sx + pw * bw + (ix + 0.5) * bw / gw)
                                for iy in range(gh) for ix in range(gw))
                    result[k, c, ph, pw] = total / max(gh * gw, 1)
    return result


@pytest.mark.parametrize("ratio", [2, -1])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_the_kernel_point_by_point(torchvision, ratio, aligned):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 3, 9, 11))
    rois = np.array([[0, 1.0, 1.5, 7.0, 6.0], [1, -3.0, -2.0, 4.0, 5.0], [0, 8.5, 6.0, 23.0, 19.0],
                     [1, 2.0, 2.0, 2.5, 2.2], [1, 0.0, 0.0, 21.0, 17.0]])
    got = torchvision.ops.roi_align(torch.tensor(features, dtype=torch.float32), torch.tensor(rois, dtype=torch.float32),
                                    3, spatial_scale=0.5, sampling_ratio=ratio, aligned=aligned)
    np.testing.assert_allclose(got.numpy(), brute_roi_align(features, rois, 0.5, 3, ratio, aligned), atol=1e-5)


def test_roi_align_backpropagates_its_exact_gradient(torchvision):
    features = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0], [1, -1.0, 2.0, 6.0, 3.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: torchvision.ops.roi_align(f, rois, 2, spatial_scale=1.0, sampling_ratio=2, aligned=True), (features,))


def tiny_network() -> Network:
    return Network(family="maskrcnn", features=[8, 16, 16], kernel_sizes=[[3, 3]] * 3,
                   strides=[[1, 1], [2, 2], [2, 2]], blocks_per_stage=[1, 1, 1], fpn_channels=16,
                   anchor_sizes=[4, 8, 16], max_instances=50)


def test_objects_are_the_connected_components_of_each_class():
    labels = np.zeros((12, 12), np.int16)
    labels[1:4, 1:4] = 1
    labels[4:6, 4:6] = 1  # touches the first diagonally: one object under full connectivity
    labels[8:11, 1:3] = 2
    labels[8:11, 3:5] = 1  # beside a class-2 object: its own object
    labels[0, 11] = 3  # an ignore / out-of-range value: no object
    masks, classes = objects_of(labels, 3)
    assert classes.tolist() == [1, 1, 2]
    assert [int(m.sum()) for m in masks] == [13, 6, 6]
    (t,) = targets_from_labels(torch.from_numpy(labels)[None], 3)
    assert t["boxes"].tolist()[0] == [1.0, 1.0, 6.0, 6.0] and t["masks"].shape == (3, 12, 12)


def test_maskrcnn_trains_on_labels_and_predicts_class_probabilities(torchvision):
    from autoseg.losses import build_loss
    from autoseg.nets import build_network, training_outputs
    from autoseg.schema.plans import Loss

    torch.manual_seed(0)
    cfg = tiny_network()
    model = build_network(cfg, 2, 3, 2)
    assert training_outputs(cfg, 2, 3, 2) == 1
    images = torch.randn(2, 2, 32, 32)
    target = torch.zeros(2, 32, 32, dtype=torch.int16)
    target[0, 4:12, 4:12], target[0, 20:28, 10:16], target[1, 8:20, 8:18] = 1, 2, 1
    terms = model.train()(images, target)
    assert {"loss_mask", "loss_classifier", "loss_objectness"} <= set(terms)
    loss = build_loss(Loss(name="maskrcnn"), 3)(terms, target)
    loss.backward()
    assert torch.isfinite(loss) and model.detector.backbone.body.stem[0].weight.grad.abs().sum() > 0
    logp = model.eval()(images)
    assert logp.shape == (2, 3, 32, 32)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2, 32, 32))


def test_mask_voting_keeps_objects_most_folds_found():
    def square(y, x, size=6):
        m = np.zeros((20, 20), np.float32)
        m[y:y + size, x:x + size] = 0.9
        return m

    folds = [[Detection(1, 0.9, square(2, 2), 0), Detection(2, 0.8, square(10, 10), 0)],
             [Detection(1, 0.8, square(3, 2), 1), Detection(1, 0.7, square(12, 2), 1)],
             [Detection(1, 0.9, square(2, 3), 2), Detection(2, 0.6, square(10, 11), 2)]]
    instance_map, objects = vote_instances(folds)
    # the first object: three folds; the class-2 one: two folds (0.47 mean score, under 0.5); the third: one fold
    assert [o["label"] for o in objects] == [1]
    assert objects[0]["score"] == pytest.approx((0.9 + 0.8 + 0.9) / 3)
    assert set(np.unique(instance_map)) == {0, 1}
    assert instance_map[3, 3] == 1 and instance_map[2, 2] == 0  # pixels two of three folds cover
    instance_map, objects = vote_instances(folds, min_score=0.4)
    assert [o["label"] for o in objects] == [1, 2]


def test_an_object_keeps_only_the_pixels_the_label_map_gives_its_class():
    from autoseg.detected_instances import agree_with_labels

    instances = np.zeros((6, 6), np.int32)
    instances[0:3, 0:3], instances[3:6, 3:6], instances[0:2, 4:6] = 1, 2, 3
    seg = np.zeros((6, 6), np.uint8)
    seg[0:3, 0:2] = 1  # object 1 (class 1) keeps two columns
    seg[3:6, 3:6] = 1  # object 2 is class 2: none of its pixels are
    seg[0:2, 4:6] = 2
    out, kept = agree_with_labels(instances, [{"label": 1, "score": 0.9}, {"label": 2, "score": 0.8},
                                              {"label": 2, "score": 0.7}], seg)
    assert [o["score"] for o in kept] == [0.9, 0.7]
    assert (out == 1).sum() == 6 and (out == 2).sum() == 4 and out.max() == 2


def test_anchors_start_at_the_smallest_typical_object_and_double_per_level():
    from autoseg.plan.maskrcnn import anchor_sizes, network_for

    assert anchor_sizes([6.3, 10.3], 4) == [8, 16, 32, 64]
    assert anchor_sizes([2.0], 3) == [4, 8, 16]  # never below 4 pixels
    assert anchor_sizes([40.0, 90.0], 4) == [32, 64, 128, 256]
    net = network_for([128, 128], 16, 32, [12.0, 40.0], 200)
    assert net.family == "maskrcnn" and len(net.anchor_sizes) == len(net.features)
    assert net.strides[0] == [1, 1] and all(s == [2, 2] for s in net.strides[1:])
    assert len(net.features) - 1 == 5  # objects of 40 px: stages until the coarsest stride (32) reaches them


def test_a_plan_pairs_the_maskrcnn_family_with_its_loss_and_detections():
    from dataclasses import replace

    from autoseg.errors import UserError
    from autoseg.schema.plans import (
        Configuration,
        Instances,
        Loss,
        Normalization,
        Resampling,
        _check_configuration,
    )

    cfg = Configuration(name="2d_maskrcnn", ndim=2, spacing=[1.0, 1.0], median_shape=[32, 32], patch_size=[32, 32],
                        batch_size=2, normalization=[Normalization()], resampling=Resampling(), network=tiny_network(), loss=Loss(name="maskrcnn"),
                        instances=Instances(method="detections"))
    _check_configuration(cfg, "c", 1)
    with pytest.raises(UserError, match="loss"):
        _check_configuration(replace(cfg, loss=Loss()), "c", 1)
    with pytest.raises(UserError, match="detections"):
        _check_configuration(replace(cfg, instances=Instances()), "c", 1)


@pytest.mark.slow
def test_plan_train_predict_a_maskrcnn_on_touching_nuclei_from_the_cli(tmp_path, torchvision):
    """2.5 CPU-minutes (15 wall minutes on the shared, loaded 2-core machine): plan offers 2d_maskrcnn, a few dozen steps train it, predict writes
    the label map, the instance map comes back in the input's geometry, and the ONNX export passes parity."""
    import json

    from autoseg.cli import run
    from autoseg.inference import Predictor
    from autoseg.io import read_images, read_label
    from autoseg.synth.core import generate

    ds = generate("nuclei", tmp_path / "nuclei", cases=4, size="tiny")
    work, out = tmp_path / "work", tmp_path / "out"
    assert run(["plan", str(ds), "--workdir", str(work), "--budget", "1m", "-q"]) == 0
    cfg = json.loads((work / "plans.json").read_text())["configurations"]["2d_maskrcnn"]
    assert cfg["network"]["family"] == "maskrcnn" and cfg["loss"]["name"] == "maskrcnn"
    assert run(["train", str(ds), "--workdir", str(work), "--config", "2d_maskrcnn", "--fold", "0", "--steps", "12",
                "--workers", "0", "-q"]) == 0
    assert (work / "model.autoseg").is_file()
    assert run(["predict", str(work / "model.autoseg"), str(ds / "imagesTs"), str(out), "--mirror", "off", "-q"]) == 0
    case = sorted((ds / "imagesTs").glob("*_0000.png"))[0].name.removesuffix("_0000.png")
    images, geometry = read_images([ds / "imagesTs" / f"{case}_000{c}.png" for c in range(3)])
    written = read_label(out / "instances" / f"{case}.png")[0]
    assert written.shape == images.shape[1:]
    assert (out / "instances.csv").is_file()
    predictor = Predictor.from_workdir(work, mirror="off")
    got = predictor.predict(images, geometry, instances=True, case_id=case)
    np.testing.assert_array_equal(got.instances, written)
    seg = got.labels
    for i in range(1, int(got.instances.max()) + 1):  # one class per object, the label map's
        assert len(np.unique(seg[got.instances == i])) == 1 and seg[got.instances == i][0] > 0
    if importlib.util.find_spec("onnxruntime") is not None:
        assert run(["export", str(work / "model.autoseg"), "--onnx", str(tmp_path / "onnx")]) == 0
