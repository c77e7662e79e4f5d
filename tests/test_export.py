"""ONNX export: a real ONNX Runtime session must reproduce the PyTorch model and carry its metadata."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest

from conftest import make_dataset
from crackscan.cli import main
import torch

from crackscan.export import OnnxRunner, _BorderedConv, _PixelsIn, cache_dir, cell_logits_runner, export_onnx
from crackscan.images import load_patch
from crackscan.model import ModelError, build_model, load_model


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("calib"), per_class=12, size=80, seed=3)
    return sorted(root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def fp32_export(model, patches, tmp_path_factory):
    """One fp32 export shared by the tests that only read it."""
    path = tmp_path_factory.mktemp("fp32") / "m.onnx"
    return export_onnx(model, path, parity=patches), path


def test_fp32_export_matches_pytorch(model, patches, fp32_export):
    report, path = fp32_export
    assert report.max_abs_logit_diff < 1e-3 and report.label_agreement == 1.0
    assert report.n_parity == len(patches) and report.parity_images == "given" and not report.int8
    assert report.size_bytes == path.stat().st_size and report.opset == 17
    assert json.loads(json.dumps(report.to_dict()))["path"] == str(path)
    # no temporary file left beside the output
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]
    runner = OnnxRunner.from_file(path)
    pixels = np.stack([load_patch(p, model.input_size) for p in patches])
    ours, reference = runner.logits(pixels), model.logits(pixels)
    assert ours.dtype == np.float32 and ours.shape == (len(patches), 2)
    assert np.abs(ours - reference).max() < 1e-3
    assert (ours.argmax(1) == reference.argmax(1)).all()
    assert runner.logits(pixels[:1]).shape == (1, 2)  # dynamic batch axis
    with pytest.raises(ValueError, match=f"N x {model.input_size} x {model.input_size} x 3"):
        runner.logits(pixels[:, :32, :32])


def test_exported_file_describes_itself(model, fp32_export):
    _, path = fp32_export
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["crackscan"]) == model.meta
    assert json.loads(props["classes"]) == model.classes and int(props["crack_index"]) == model.crack_index
    assert int(props["input_size"]) == model.input_size and float(props["threshold"]) == model.threshold
    assert json.loads(props["mean"]) == list(model.mean) and json.loads(props["std"]) == list(model.std)
    assert proto.opset_import[0].version == 17
    inputs = proto.graph.input[0].type.tensor_type
    assert inputs.elem_type == onnx.TensorProto.UINT8
    assert inputs.shape.dim[0].dim_param and [d.dim_value for d in inputs.shape.dim[1:]] == [64, 64, 3]
    assert OnnxRunner.from_file(path).meta == model.meta


def test_int8_export_runs_and_reports_agreement(model, patches, tmp_path):
    report = export_onnx(model, tmp_path / "q.onnx", int8=True, calibration=patches[:16], parity=patches[16:])
    assert report.int8 and report.n_calibration == 16 and "per tensor" in report.quantization
    assert 0.0 <= report.label_agreement <= 1.0 and report.n_parity == len(patches) - 16
    assert report.size_bytes == (tmp_path / "q.onnx").stat().st_size
    assert report.size_bytes < 4_000_000  # int8 weights: well under half of the ~8.9 MB fp32 graph
    proto = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not ops & {"Sub", "Div"}  # the normalisation is folded into the first convolution
    runner = OnnxRunner.from_file(tmp_path / "q.onnx")
    assert runner.meta == model.meta
    pixels = np.stack([load_patch(p, model.input_size) for p in patches[16:]])
    logits = runner.logits(pixels)
    assert np.isfinite(logits).all()
    assert float(np.abs(logits - model.logits(pixels)).max()) == pytest.approx(report.max_abs_logit_diff, abs=1e-5)
    with pytest.raises(ValueError, match="calibration"):
        export_onnx(model, tmp_path / "x.onnx", int8=True)
    assert not (tmp_path / "x.onnx").exists()


def test_folding_the_normalisation_changes_nothing(model):
    # The first blocks of a fresh base: the tiny test model's outputs, and a fresh base's deep features, are
    # near zero, and any fold would pass on them.
    torch.manual_seed(0)
    size, features = model.input_size, build_model().features[:2].eval()
    with torch.no_grad():  # BatchNorm statistics of a trained model, not the identity a fresh one starts as
        for norm in (m for m in features.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            for tensor, low, high in ((norm.running_mean, -0.5, 0.5), (norm.running_var, 0.5, 2.0),
                                      (norm.weight, 0.5, 1.5), (norm.bias, -0.5, 0.5)):
                tensor.uniform_(low, high)
    plain = _PixelsIn(features, model.mean, model.std, size).eval()
    folded = _PixelsIn(features, model.mean, model.std, size, fold=True).eval()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    pixels[0], pixels[1, :3], pixels[2, :, -3:] = 255, 0, 255  # saturated images and edges: the border map counts
    with torch.inference_mode():
        want, got = plain(torch.from_numpy(pixels)), folded(torch.from_numpy(pixels))
    assert float(want.abs().max()) > 0.1
    assert (got - want).abs().max() < 1e-4 * float(want.abs().max())
    layer = next(m for m in folded.modules() if isinstance(m, _BorderedConv))
    border = layer.border[0].abs().amax(dim=0)
    # What the padding taps would have carried: only along the edges, and there it matters.
    assert float(border[1:-1, 1:-1].max()) < 1e-4 < float(border[0].min())
    assert not any(isinstance(m, _BorderedConv) for m in features.modules())  # the model itself is left as it was
    assert not features.training


def test_unreadable_images_are_skipped_and_reported(model, patches, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    report = export_onnx(model, tmp_path / "m.onnx", parity=[broken, *patches[:3]])
    assert report.n_parity == 3 and len(report.skipped) == 1 and str(broken) in report.skipped[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(broken) in err
    with pytest.raises(ValueError, match="no readable parity images"):
        export_onnx(model, tmp_path / "n.onnx", parity=[broken])


def test_from_file_refuses_what_is_not_a_crackscan_export(tmp_path):
    with pytest.raises(ModelError, match="no such ONNX file"):
        OnnxRunner.from_file(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf")
    with pytest.raises(ModelError, match="not a readable ONNX model") as err:
        OnnxRunner.from_file(junk)
    assert "\n" not in str(err.value) and str(junk) in str(err.value)
    # a valid ONNX graph without crackscan metadata
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(plain))
    with pytest.raises(ModelError, match="not a crackscan ONNX export"):
        OnnxRunner.from_file(plain)


def test_onnx_backend_equals_torch_and_is_cached(tiny_model_path, patches, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = load_model(tiny_model_path)
    pixels = np.stack([load_patch(p, model.input_size) for p in patches])
    onnx_p = model.crack_probability(pixels, backend="onnx")
    torch_p = model.crack_probability(pixels, backend="torch")
    assert np.allclose(onnx_p, torch_p, atol=1e-4)
    folder = cache_dir()
    assert folder == tmp_path / "cache" / "crackscan" / "onnx"
    cached = list(folder.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".onnx"  # and no temporary file
    inode = cached[0].stat().st_ino
    again = load_model(tiny_model_path)
    assert np.allclose(again.crack_probability(pixels, backend="onnx"), onnx_p, atol=1e-6)
    assert cached[0].stat().st_ino == inode  # reused, not rewritten (a rewrite renames a new file in)
    assert OnnxRunner.from_model(again).path == str(cached[0])

    # A damaged cache entry is rebuilt rather than trusted.
    cached[0].write_bytes(b"truncated")
    rebuilt = OnnxRunner.from_model(again)
    assert np.allclose(rebuilt.logits(pixels), again.logits(pixels), atol=1e-3)
    assert cached[0].stat().st_size > 1_000_000

    # A cache folder that cannot be created still gives a working runner, from memory.
    (tmp_path / "file").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    in_memory = OnnxRunner.from_model(again)
    assert in_memory.path == "" and np.allclose(in_memory.logits(pixels), rebuilt.logits(pixels), atol=1e-6)


def test_a_cache_folder_this_user_may_not_enter_costs_only_the_cache(tiny_model_path, tmp_path):
    import subprocess
    import sys

    from corpus import drop_privileges_prefix

    (tmp_path / "cache" / "crackscan").mkdir(parents=True)
    (tmp_path / "cache" / "crackscan").chmod(0)
    code = ("import sys, numpy as np\n"
            "from crackscan.export import OnnxRunner\n"
            "from crackscan.model import load_model\n"
            "model = load_model(sys.argv[1])\n"
            "runner = OnnxRunner.from_model(model)\n"
            "pixels = np.zeros((1, model.input_size, model.input_size, 3), np.uint8)\n"
            "print(repr(runner.path), runner.logits(pixels).shape)\n")
    try:
        done = subprocess.run([*drop_privileges_prefix(), sys.executable, "-c", code, str(tiny_model_path)],
                              capture_output=True, text=True, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
        entered = os.access(tmp_path / "cache" / "crackscan", os.X_OK) and not drop_privileges_prefix()
    finally:
        (tmp_path / "cache" / "crackscan").chmod(0o755)
    if entered:
        pytest.skip("mode 000 does not stop this process (root without setpriv): nothing to test")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "'' (1, 2)"  # from memory, and it classifies


def test_whole_image_graph_is_cached_beside_the_patch_graph(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pixels = np.random.default_rng(0).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    first = cell_logits_runner(load_model(tiny_model_path))(pixels)
    cached = list(cache_dir().iterdir())
    assert [p.name.endswith("-cells.onnx") for p in cached] == [True]
    inode = cached[0].stat().st_ino
    again = cell_logits_runner(load_model(tiny_model_path))(pixels)
    assert cached[0].stat().st_ino == inode  # reused, not exported again
    assert first.shape == (2, 4, 3) and np.array_equal(first, again)
    # The patch graph of the same model is another file.
    OnnxRunner.from_model(load_model(tiny_model_path))
    assert len(list(cache_dir().glob("*.onnx"))) == 2


def test_export_cli(tiny_model_path, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code = main(["export", str(tiny_model_path), "--format", "onnx", "-o", str(tmp_path / "cli.onnx")])
    finally:
        os.umask(old)
    assert code == 0
    # Written as any new file is (not private, 0600): a service running as another user can load it.
    assert stat.S_IMODE((tmp_path / "cli.onnx").stat().st_mode) == 0o644
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["path"] == str(tmp_path / "cli.onnx") and report["max_abs_logit_diff"] < 1e-3
    assert f"wrote {tmp_path / 'cli.onnx'}" in captured.err and "100.0% of 32 generated images" in captured.err
    assert OnnxRunner.from_file(tmp_path / "cli.onnx").meta == load_model(tiny_model_path).meta
    assert main(["export", str(tiny_model_path), "--int8", "-o", str(tmp_path / "q.onnx")]) == 2
    assert not (tmp_path / "q.onnx").exists()


def test_exported_files_are_models_for_predict_and_evaluate(model, patches, fp32_export, tmp_path, capsys):
    # An exported file (fp32 here, int8 the same way) is a model: predict and evaluate take it and run
    # it with ONNX Runtime; commands that need the network say so in one line.
    _, path = fp32_export
    onnx_model = load_model(path)
    assert onnx_model.module is None and onnx_model.meta == model.meta
    pixels = np.stack([load_patch(p, model.input_size) for p in patches])
    np.testing.assert_allclose(onnx_model.crack_probability(pixels), model.crack_probability(pixels, backend="torch"),
                               atol=1e-4)
    with pytest.raises(ModelError, match="needs the PyTorch model"):
        onnx_model.crack_probability(pixels, backend="torch")

    assert main(["predict", str(path), *map(str, patches[:4]), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = model.crack_probability(pixels[:4], backend="torch")
    assert [r["crack_probability"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-4)

    data = patches[0].parent.parent
    assert main(["evaluate", str(path), str(data), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == len(patches)

    capsys.readouterr()
    assert main(["scan", str(path), str(patches[0]), "--out", str(tmp_path / "scan")]) == 2
    assert "scan needs the PyTorch model" in capsys.readouterr().err
    # Choosing a scan threshold scans too: said at once, before the data is read (none is there to read).
    assert main(["evaluate", str(path), str(tmp_path / "absent"), "--split", "s.csv", "--scan-mosaics", "4"]) == 2
    assert "choosing a scan threshold needs the PyTorch model" in capsys.readouterr().err
    # So does a threshold saved in the model: an ONNX file is not rewritten.
    assert main(["evaluate", str(path), str(tmp_path / "absent"), "--split", "s.csv", "--target-recall", "0.9"]) == 2
    assert "saving a threshold in the model needs the PyTorch model" in capsys.readouterr().err


def test_export_cli_refuses_outputs_and_inputs_before_the_work(tiny_model_path, patches, tmp_path, capsys):
    model_copy = tmp_path / "mine.safetensors"
    model_copy.write_bytes(tiny_model_path.read_bytes())
    before = model_copy.read_bytes()
    # Not over the model file itself (nor any file not named *.onnx: crackscan knows ONNX models by suffix).
    assert main(["export", str(model_copy), "-o", str(model_copy)]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert model_copy.read_bytes() == before
    # An output that cannot be written is said at once, under the name given.
    (tmp_path / "folder.onnx").mkdir()
    assert main(["export", str(model_copy), "-o", str(tmp_path / "folder.onnx")]) == 2
    assert "-o " + str(tmp_path / "folder.onnx") + ": cannot write a file there (a folder)" in capsys.readouterr().err
    (tmp_path / "plain-file").write_text("")
    assert main(["export", str(model_copy), "-o", str(tmp_path / "plain-file" / "m.onnx")]) == 2
    assert f"cannot write a file there ({tmp_path / 'plain-file'} is not a folder)" in capsys.readouterr().err
    assert main(["export", str(model_copy), "-o", str(tmp_path / "M.ONNX")]) == 2  # predict would not know it
    assert "must end in .onnx" in capsys.readouterr().err
    # A folder of images that holds none is an error, not a silent fall-back to generated patches.
    (tmp_path / "empty").mkdir()
    assert main(["export", str(model_copy), "--parity", str(tmp_path / "empty"), "-o", str(tmp_path / "p.onnx")]) == 2
    assert "no image files in" in capsys.readouterr().err
    assert main(["export", str(model_copy), "--int8", "--calibration", str(tmp_path / "empty"),
                 "-o", str(tmp_path / "q.onnx")]) == 2
    assert "no image files in" in capsys.readouterr().err
    # Calibration images without --int8 would be ignored: said, not ignored.
    assert main(["export", str(model_copy), "--calibration", str(patches[0].parent), "-o", str(tmp_path / "c.onnx")]) == 2
    assert "--calibration is for --int8 exports only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "folder.onnx", "mine.safetensors", "plain-file"]
    # A folder that does not exist yet is made, as before.
    assert main(["export", str(model_copy), "-o", str(tmp_path / "new" / "deeper" / "m.onnx")]) == 0
    assert (tmp_path / "new" / "deeper" / "m.onnx").is_file()


def test_export_cli_exit_code_says_skipped_parity_images(tiny_model_path, patches, tmp_path, capsys):
    folder = tmp_path / "parity"
    folder.mkdir()
    for p in patches[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["export", str(tiny_model_path), "--parity", str(folder), "-o", str(tmp_path / "m.onnx")]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["n_parity"] == 3 and len(report["skipped"]) == 1 and "broken.jpg" in captured.err
    assert (tmp_path / "m.onnx").is_file()


def test_an_onnx_file_whose_metadata_does_not_match_its_graph_is_refused(fp32_export, tmp_path, capsys):
    # Metadata edited to another input size: predict once died inside ONNX Runtime with a traceback.
    _, path = fp32_export
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "input_size":
            entry.value = "128"
        if entry.key == "crackscan":
            entry.value = json.dumps(json.loads(entry.value) | {"input_size": 128})
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    with pytest.raises(ModelError, match=r"its graph takes pixels tensor\(uint8\).*\[batch, 128, 128, 3\]"):
        OnnxRunner.from_file(edited)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (120, 120, 120)).save(image)
    assert main(["predict", str(edited), str(image)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
