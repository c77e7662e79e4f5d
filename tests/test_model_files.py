"""Model and weights files that are broken, mismatched or hostile give one clear error, never a crash.

Models are safetensors + JSON (nothing unpickled); a user's ``.pth`` is read with ``weights_only=True``,
so a pickle that would run code is refused, and the code never runs.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_dataset
from crackscan.cli import main
from crackscan.model import (
    META_KEY,
    ModelError,
    build_model,
    load_model,
    load_pretrained_base,
    make_meta,
    read_state_dict,
    save_model,
)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in build_model().state_dict().items()}


def good_meta(**changes) -> dict:
    meta = make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=64)
    meta.update(changes)
    return meta


def write(path: Path, tensors: dict[str, torch.Tensor], metadata_text: str | None) -> Path:
    save_file(tensors, str(path), metadata=None if metadata_text is None else {META_KEY: metadata_text})
    return path


def without(meta: dict, key: str) -> dict:
    return {k: v for k, v in meta.items() if k != key}


def broken_files(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple[Path, str]]:
    """name -> (file, fragment the error message must contain)."""
    three = {k: v.contiguous() for k, v in build_model(num_classes=3).state_dict().items()}
    files = {
        "metadata-not-json": (write(folder / "a.safetensors", state, "{not json"), "not valid json"),
        "metadata-a-list": (write(folder / "b.safetensors", state, "[1, 2]"), "not an object"),
        "metadata-null": (write(folder / "c.safetensors", state, "null"), "not an object"),
        "no-metadata": (write(folder / "d.safetensors", state, None), "no crackscan metadata"),
        "missing-classes": (write(folder / "e.safetensors", state, json.dumps(without(good_meta(), "classes"))), "lacks classes"),
        "missing-input-size": (write(folder / "f.safetensors", state, json.dumps(without(good_meta(), "input_size"))), "lacks input_size"),
        "crack-index-out-of-range": (write(folder / "g.safetensors", state, json.dumps(good_meta(crack_index=5))), "crack_index 5"),
        "crack-index-not-a-number": (write(folder / "h.safetensors", state, json.dumps(good_meta(crack_index="one"))), "malformed"),
        "input-size-absurd": (write(folder / "i.safetensors", state, json.dumps(good_meta(input_size=100000))), "input_size"),
        "threshold-out-of-range": (write(folder / "j.safetensors", state, json.dumps(good_meta(threshold=3))), "threshold"),
        "mean-wrong-length": (write(folder / "k.safetensors", state, json.dumps(good_meta(mean=[0.5, 0.5]))), "mean and std"),
        "other-architecture": (write(folder / "l.safetensors", state, json.dumps(good_meta(architecture="resnet50"))), "architecture"),
        "newer-format": (write(folder / "m.safetensors", state, json.dumps(good_meta(format_version=99))), "newer"),
        "head-3-meta-2": (write(folder / "n.safetensors", three, json.dumps(good_meta())), "classifier.1.weight"),
        "missing-tensors": (
            write(folder / "o.safetensors", {k: v for k, v in state.items() if not k.startswith("classifier")},
                  json.dumps(good_meta())),
            "missing",
        ),
        "random-bytes": ((folder / "p.safetensors"), "not a readable safetensors"),
        "truncated": ((folder / "q.safetensors"), "not a readable safetensors"),
        "pth-file": ((folder / "r.pth"), ".safetensors files"),
        "empty-folder": ((folder / "run"), "without model.safetensors"),
        "missing-file": ((folder / "nope.safetensors"), "no such model file"),
    }
    (folder / "p.safetensors").write_bytes(os.urandom(4096))
    whole = (folder / "d.safetensors").read_bytes()
    (folder / "q.safetensors").write_bytes(whole[: len(whole) // 2])
    torch.save(state, folder / "r.pth")
    (folder / "run").mkdir()
    return files


@pytest.fixture(scope="module")
def broken(tmp_path_factory, state):
    return broken_files(tmp_path_factory.mktemp("models"), state)


CASES = [
    "metadata-not-json", "metadata-a-list", "metadata-null", "no-metadata", "missing-classes", "missing-input-size",
    "crack-index-out-of-range", "crack-index-not-a-number", "input-size-absurd", "threshold-out-of-range",
    "mean-wrong-length", "other-architecture", "newer-format", "head-3-meta-2", "missing-tensors", "random-bytes",
    "truncated", "pth-file", "empty-folder", "missing-file",
]


@pytest.mark.parametrize("case", CASES)
def test_load_model_refuses_with_a_clear_message(broken, case):
    path, fragment = broken[case]
    with pytest.raises(ModelError) as caught:
        load_model(path)
    message = str(caught.value)
    assert fragment.lower() in message.lower() and str(path) in message and "\n" not in message, message


@pytest.mark.parametrize("case", ["metadata-not-json", "crack-index-out-of-range", "head-3-meta-2", "random-bytes", "pth-file"])
def test_cli_gives_one_line_and_exit_2(broken, case, tmp_path, capsys):
    path, fragment = broken[case]
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (128, 128, 128)).save(image)
    code = main(["predict", "--model", str(path), str(image)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment.lower() in lines[0].lower(), captured.err
    assert lines[0].startswith("crackscan: error:") and "Traceback" not in captured.out + captured.err


def test_matching_tensors_and_metadata_load(tmp_path, state):
    module = build_model()
    module.load_state_dict(state)
    path = save_model(tmp_path / "ok.safetensors", module, good_meta())
    model = load_model(path)
    assert model.classes == ["Negative", "Positive"] and model.crack_class == "Positive" and model.input_size == 64


def test_saved_model_files_are_readable_by_others(tmp_path, state):
    # A private (0600) model file breaks a service running as another user; saves follow the umask.
    old = os.umask(0o022)
    try:
        module = build_model()
        path = save_model(tmp_path / "shared.safetensors", module, good_meta())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_the_umask_is_read_without_being_changed():
    from crackscan.model import _umask

    old = os.umask(0o027)
    try:
        assert _umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was: nothing set it to 0 on the way
    finally:
        os.umask(old)


class _RunsCode:
    """A pickle that, when unpickled without weights_only, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_a_pth_is_refused_and_never_runs(tmp_path, state):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "weights.pth"
    torch.save({**state, "extra": _RunsCode(marker)}, evil)
    with pytest.raises(ModelError, match="weights_only=True"):
        read_state_dict(evil)
    assert not marker.exists()


def test_a_plain_pth_state_dict_is_accepted_as_weights(tmp_path, state):
    path = tmp_path / "imagenet-like.pth"
    torch.save(state, path)
    model = build_model()
    assert "file" in load_pretrained_base(model, path)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])


def test_train_with_hostile_weights_exits_2_without_running_them(tmp_path, state, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "weights.pth"
    torch.save({**state, "extra": _RunsCode(marker)}, evil)
    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    code = main(["train", str(data), "--out", str(tmp_path / "runs"), "--weights", str(evil), "--input-size", "32",
                 "--run-length", "1", "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "weights_only=True" in lines[0], err
    assert not marker.exists()


def test_a_failed_atomic_write_names_the_file_asked_for_and_leaves_no_temporary(tmp_path):
    from crackscan.model import atomic_write

    (tmp_path / "taken.onnx").mkdir()  # the rename fails: a folder is in the way
    with pytest.raises(IsADirectoryError) as err:
        atomic_write(tmp_path / "taken.onnx", lambda tmp: Path(tmp).write_bytes(b"graph"))
    assert f"cannot write {tmp_path / 'taken.onnx'}" in str(err.value) and ".tmp" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]
