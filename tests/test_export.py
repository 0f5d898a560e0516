"""autoseg export: each fold's network as ONNX / TorchScript with dynamic spatial sizes, the JSON around it,
and the parity check against PyTorch (ONNX parts skip when onnxruntime is not installed)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import make_workdir

from autoseg.bundle import load_bundle, pack_bundle
from autoseg.cli import run
from autoseg.export import PARITY_TOL, _parity_shape
from autoseg.nets import build_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    _, work, _ = make_workdir(tmp_path_factory.mktemp("export"), "ct-aniso", "3d_fullres", 3, [8, 16, 16], [1, 2],
                              cases=2)
    return pack_bundle(work)


def torch_net(bundle: Path, fold: int) -> torch.nn.Module:
    b = load_bundle(bundle)
    cfg = b.plans.configurations["3d_fullres"]
    net = build_network(cfg.network, b.plans.in_channels, b.plans.num_classes, cfg.ndim)
    net.load_state_dict(b.weights["3d_fullres"][fold])
    return net.eval()


def check_outputs(out: Path, suffix: str) -> dict:
    info = json.loads((out / "export.json").read_text())
    assert sorted(m["file"] for m in info["models"]) == [f"3d_fullres_fold_{k}{suffix}" for k in (0, 1)]
    for m in info["models"]:
        assert m["parity"]["max_abs_diff"] <= PARITY_TOL
        assert m["parity"]["input_shape"][2:] != m["input"]["traced_shape"][2:]  # another size than traced
    plans = json.loads((out / "plans.json").read_text())
    norm = plans["configurations"]["3d_fullres"]["normalization"][0]
    assert norm["scheme"] == "ct" and norm["mean"] is not None
    assert json.loads((out / "postprocessing.json").read_text())["rules"] == {"3d_fullres": []}
    assert (out / "README.md").read_text().startswith("# autoseg model")
    return info


def test_torchscript_export_matches_pytorch_at_another_size(bundle, tmp_path, capsys):
    out = tmp_path / "ts"
    assert run(["export", str(bundle), "--torchscript", str(out)]) == 0
    assert "parity with PyTorch" in capsys.readouterr().out
    check_outputs(out, ".pt")
    net = torch_net(bundle, 1)
    x = torch.randn(1, 1, 16, 32, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; libtorch users load it
        loaded = torch.jit.load(str(out / "3d_fullres_fold_1.pt"))
    with torch.no_grad():
        diff = (loaded(x) - net(x)).abs().max().item()
    assert diff <= PARITY_TOL


def test_onnx_export_matches_pytorch_within_tolerance_with_dynamic_spatial_axes(bundle, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert run(["export", str(bundle), "--onnx", str(out)]) == 0
    check_outputs(out, ".onnx")
    sess = ort.InferenceSession(str(out / "3d_fullres_fold_0.onnx"), providers=["CPUExecutionProvider"])
    net = torch_net(bundle, 0)
    for shape in ([1, 1, 8, 16, 16], [3, 1, 16, 48, 32]):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(["logits"], {"image": x.numpy()})[0]
        assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= PARITY_TOL


def test_onnx_without_onnxruntime_says_what_to_install(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert run(["export", str(bundle), "--onnx", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime is not installed" in err and "pip install" in err


def test_export_needs_a_format(bundle, capsys):
    assert run(["export", str(bundle)]) == 2
    assert "--onnx DIR" in capsys.readouterr().err


def test_parity_input_is_a_stride_multiple_other_than_the_patch():
    assert _parity_shape([8, 16, 16], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]) == [10, 20, 20]


def test_a_region_model_exports_its_regions_and_sigmoid_pipeline(tmp_path):
    _, work, _ = make_workdir(tmp_path / "regions", "brats-like", "3d_fullres", 3, [16, 16, 16], [1, 2], cases=2)
    out = tmp_path / "ts"
    assert run(["-q", "export", str(pack_bundle(work)), "--torchscript", str(out)]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["regions"] == {"outputs": [{"name": "whole tumour", "values": [1, 2, 3]},
                                           {"name": "tumour core", "values": [2, 3]},
                                           {"name": "enhancing tumour", "values": [3]}],
                               "regions_class_order": [1, 2, 3]}
    assert all(m["output"] == {"name": "logits", "classes": 3, "activation": "sigmoid"} for m in info["models"])
    assert "sigmoid" in " ".join(info["pipeline"]) and "regions_class_order" in " ".join(info["pipeline"])
    assert "Regions: one sigmoid output per region" in (out / "README.md").read_text()
