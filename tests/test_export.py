"""ONNX export: a real ONNX Runtime session must reproduce the PyTorch model and carry its metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import make_dataset
from crackscan.cli import main
from crackscan.export import OnnxRunner, export_onnx
from crackscan.model import load_model


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("calib"), per_class=12, size=80, seed=3)
    return sorted(root.rglob("*.jpg"))


def test_fp32_export_matches_pytorch_and_carries_metadata(tiny_model_path, patches, tmp_path):
    model = load_model(tiny_model_path)
    report = export_onnx(model, tmp_path / "m.onnx", parity=patches)
    assert report.max_abs_logit_diff < 1e-3 and report.label_agreement == 1.0 and report.n_parity == len(patches)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == model.classes
    assert int(props["input_size"]) == model.input_size and float(props["threshold"]) == model.threshold
    assert json.loads(props["mean"]) == list(model.mean) and json.loads(props["std"]) == list(model.std)
    assert proto.opset_import[0].version == 17
    runner = OnnxRunner.from_file(tmp_path / "m.onnx")
    assert runner.meta == model.meta
    from crackscan.images import load_patch

    pixels = np.stack([load_patch(p, model.input_size) for p in patches[:5]])
    assert np.allclose(runner.logits(pixels), model.logits(pixels), atol=1e-3)
    # dynamic batch axis: one image and many
    assert runner.logits(pixels[:1]).shape == (1, 2)


def test_int8_export_runs_and_reports_agreement(tiny_model_path, patches, tmp_path):
    model = load_model(tiny_model_path)
    report = export_onnx(model, tmp_path / "q.onnx", int8=True, calibration=patches[:16], parity=patches[16:])
    assert report.int8 and 0.0 <= report.label_agreement <= 1.0
    assert report.size_bytes == (tmp_path / "q.onnx").stat().st_size
    assert report.size_bytes < 4_000_000  # int8 weights: under half of the ~8.9 MB fp32 graph
    proto = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert OnnxRunner.from_file(tmp_path / "q.onnx").meta["input_size"] == model.input_size
    with pytest.raises(ValueError, match="calibration"):
        export_onnx(model, tmp_path / "x.onnx", int8=True)


def test_onnx_backend_equals_torch_and_is_cached(tiny_model_path, patches, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = load_model(tiny_model_path)
    from crackscan.images import load_patch

    pixels = np.stack([load_patch(p, model.input_size) for p in patches])
    onnx_p = model.crack_probability(pixels, backend="onnx")
    torch_p = model.crack_probability(pixels, backend="torch")
    assert np.allclose(onnx_p, torch_p, atol=1e-4)
    cached = list((tmp_path / "cache" / "crackscan" / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = load_model(tiny_model_path)
    assert np.allclose(again.crack_probability(pixels, backend="onnx"), onnx_p, atol=1e-6)
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not rewritten


def test_export_cli(tiny_model_path, patches, tmp_path, capsys):
    code = main(["export", str(tiny_model_path), "--format", "onnx", "-o", str(tmp_path / "cli.onnx")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(tmp_path / "cli.onnx") and report["max_abs_logit_diff"] < 1e-3
    assert main(["export", str(tiny_model_path), "--int8", "-o", str(tmp_path / "q.onnx")]) == 2
