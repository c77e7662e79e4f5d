"""Interrupted training, for real: SIGKILL and Ctrl-C (SIGINT) to a training process, then --resume.

One run is taken through the whole story: killed with SIGKILL during its fourth epoch, resumed and
stopped with SIGINT during its fifth (the last), resumed again to the end. While it runs, the checkpoint is read
over and over: it must always be a complete safetensors file, never a half-written one.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import IMAGENET_WEIGHTS, make_dataset
from crackscan.cli import main
from crackscan.model import META_KEY, atomic_save_tensors, load_model
from crackscan.scan import VERIFY_CROPS, default_verify

HEAD_EPOCHS, FINETUNE_EPOCHS = 1, 4
EPOCHS = HEAD_EPOCHS + FINETUNE_EPOCHS
FINETUNE_LR = 2e-4


def train_args() -> list[str]:
    weights = str(IMAGENET_WEIGHTS) if IMAGENET_WEIGHTS.exists() else "none"
    # Batch size 4 gives ~25 optimizer steps per epoch: epochs long enough (~0.6 s) to be interrupted inside.
    return ["--weights", weights, "--input-size", "64", "--head-epochs", str(HEAD_EPOCHS),
            "--finetune-epochs", str(FINETUNE_EPOCHS), "--finetune-lr", str(FINETUNE_LR), "--views", "1",
            "--run-length", "5", "--batch-size", "4", "--patience", "10", "--test-fraction", "0", "--seed", "3",
            "--dense-mosaics", "0", "--quiet"]


def start(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-W", "ignore", "-m", "crackscan.cli", "train", *args]
    # One thread: on a shared machine, OpenMP threads of several processes spinning on two cores make
    # small-batch epochs tens of times slower and their length unpredictable.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # A test runner started in the background by a shell inherits SIGINT ignored, and so would the trainer:
    # give it the default disposition, as a terminal's foreground process has, so that Ctrl-C is Ctrl-C.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"training process still running after {timeout}s: {err[-2000:]}")
    return proc.returncode, out, err


def read_history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def checkpoint_state(path: Path) -> dict | None:
    """The checkpoint's progress document, after checking the file is complete; None when absent.

    The file is opened once, so the size and header read belong to the same file even if a new
    checkpoint replaces it meanwhile. A complete safetensors file is exactly 8 + header + data bytes.
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    with handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        data_end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        total = handle.seek(0, 2)
        assert total == 8 + size + data_end, f"{path}: {total} bytes, header describes {8 + size + data_end}"
        return json.loads(header["__metadata__"][META_KEY])


@dataclass
class Watch:
    """Reads a run's checkpoint and history.csv as fast as it can while the process trains."""

    run_dir: Path
    reads: int = 0
    epochs_seen: list[int] = field(default_factory=list)

    def poll(self) -> int:
        """Check both files now; returns the number of epochs the checkpoint holds (0 when none yet)."""
        state = checkpoint_state(self.run_dir / "checkpoint.safetensors")
        if state is None:
            return 0
        self.reads += 1
        epochs = state["epoch"]
        assert [row["epoch"] for row in state["history"]] == list(range(1, epochs + 1))
        if self.epochs_seen:
            assert epochs >= self.epochs_seen[-1], "the checkpoint went back in time"
        self.epochs_seen.append(epochs)
        if (self.run_dir / "history.csv").exists():
            rows = read_history(self.run_dir)
            assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
        return epochs

    def interrupt(self, proc: subprocess.Popen, after_epochs: int, sig: int, timeout: float = 180) -> int:
        """Send ``sig`` part-way through the epoch after ``after_epochs`` saved ones; returns epochs saved then."""
        deadline = time.monotonic() + timeout
        while (saved := self.poll()) < after_epochs:
            assert proc.poll() is None, f"training ended before epoch {after_epochs}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        # Land inside the next epoch, well before it can end: wait a third of the quickest epoch so far
        # (the first epoch of a process is the slowest: allocations and kernel set-up).
        quickest = min(float(r["seconds"]) for r in read_history(self.run_dir))
        until = time.monotonic() + min(0.3, max(0.02, quickest / 3))
        while time.monotonic() < until:
            saved = self.poll()
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(sig)
        return saved


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("resume-data"), per_class=60, size=64)


@pytest.fixture(scope="module")
def story(dataset, tmp_path_factory):
    """Start, SIGKILL in epoch 4, resume, SIGINT in epoch 5, resume to the end. Records every step."""
    out = tmp_path_factory.mktemp("resume-runs")
    run_dir = out / "r"
    watch = Watch(run_dir)
    steps: dict = {}

    proc = start(str(dataset), "--out", str(out), "--name", "r", *train_args())
    try:
        steps["seen_before_kill"] = watch.interrupt(proc, after_epochs=3, sig=signal.SIGKILL)
        code, _, err = finish(proc)
    finally:
        proc.kill()
    steps["kill_code"] = code
    steps["after_kill"] = checkpoint_state(run_dir / "checkpoint.safetensors")
    steps["history_after_kill"] = read_history(run_dir)
    steps["split_after_kill"] = (run_dir / "split.csv").read_bytes()
    steps["finished_after_kill"] = (run_dir / "model.safetensors").exists()

    proc = start("--resume", str(run_dir), "--quiet")
    try:
        steps["seen_before_int"] = watch.interrupt(proc, after_epochs=steps["after_kill"]["epoch"] + 1, sig=signal.SIGINT)
        steps["int_code"], steps["int_out"], steps["int_err"] = finish(proc)
    finally:
        proc.kill()
    steps["after_int"] = checkpoint_state(run_dir / "checkpoint.safetensors")

    proc = start("--resume", str(run_dir), "--quiet")
    try:
        while proc.poll() is None:
            watch.poll()
            time.sleep(0.02)
        steps["final_code"], steps["final_out"], steps["final_err"] = finish(proc)
    finally:
        proc.kill()
    steps["watch"] = watch
    return run_dir, steps


def test_sigkill_loses_at_most_the_epoch_in_progress(story):
    run_dir, steps = story
    assert steps["kill_code"] == -signal.SIGKILL
    saved = steps["after_kill"]["epoch"]
    # Everything saved before the kill is still there; an epoch may have ended just before it landed.
    assert steps["seen_before_kill"] <= saved <= steps["seen_before_kill"] + 1
    assert [int(r["epoch"]) for r in steps["history_after_kill"]] == list(range(1, saved + 1))
    assert not steps["finished_after_kill"], "the run finished before the kill: nothing was tested"


def test_resumed_history_has_no_gap_or_duplicate(story):
    run_dir, steps = story
    assert steps["final_code"] == 0, steps["final_err"][-3000:]
    history = read_history(run_dir)
    assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
    assert [r["phase"] for r in history] == ["head"] * HEAD_EPOCHS + ["finetune"] * FINETUNE_EPOCHS
    # The epochs finished before the kill were kept, not trained again (their timings would differ).
    before = steps["history_after_kill"]
    assert history[: len(before)] == before


def test_resume_keeps_split_and_scheduler(story):
    run_dir, steps = story
    assert (run_dir / "split.csv").read_bytes() == steps["split_after_kill"]
    model = load_model(run_dir)
    assert model.meta["training"]["seed"] == 3 and model.input_size == 64
    # The cosine schedule continued across both interruptions: a restarted scheduler would repeat the
    # phase's initial rate.
    rates = [float(r["lr"]) for r in read_history(run_dir) if r["phase"] == "finetune"]
    assert rates[0] == pytest.approx(FINETUNE_LR)
    assert all(a > b for a, b in zip(rates, rates[1:])), rates


def test_ctrl_c_exits_130_with_the_resume_command(story):
    run_dir, steps = story
    assert steps["int_code"] == 130, steps["int_err"][-3000:]
    err = steps["int_err"]
    assert "Traceback" not in err + steps["int_out"], err
    assert f"--resume {run_dir}" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    # Ctrl-C lost nothing that was saved, and left a complete checkpoint.
    assert steps["after_int"]["epoch"] >= steps["seen_before_int"] > steps["after_kill"]["epoch"]


def test_checkpoint_was_never_seen_half_written(story):
    run_dir, steps = story
    watch = steps["watch"]
    # Every read above checked the file's size against its header; make sure there were many.
    assert watch.reads >= 50 and watch.epochs_seen[-1] == EPOCHS
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp")), "temporary files left behind"


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    atomic_save_tensors(path, {"a": torch.ones(3)}, {META_KEY: json.dumps({"epoch": 1, "history": []})})
    before = path.read_bytes()
    shared = torch.zeros(4)
    # safetensors refuses tensors that share memory: the save fails after the temporary file exists.
    with pytest.raises(Exception):
        atomic_save_tensors(path, {"a": shared, "b": shared}, {META_KEY: "{}"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--resume", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint" in err and len(err.strip().splitlines()) == 1, err


def test_resuming_a_finished_run_is_a_clear_error(story, capsys):
    run_dir, _ = story
    code = main(["train", "--resume", str(run_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "already finished" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(story, dataset, tmp_path):
    run_dir, _ = story
    code, _, err = finish(start(str(dataset), "--out", str(tmp_path), "--name", "u", *train_args()))
    assert code == 0, err[-3000:]
    straight, resumed = read_history(tmp_path / "u"), read_history(run_dir)
    assert [(r["epoch"], r["phase"]) for r in straight] == [(r["epoch"], r["phase"]) for r in resumed]
    assert [float(r["lr"]) for r in straight] == pytest.approx([float(r["lr"]) for r in resumed], rel=1e-9)
    assert (tmp_path / "u" / "split.csv").read_bytes() == (run_dir / "split.csv").read_bytes()
    # Same seed, same data, and the checkpoint keeps dropout's random state: the run goes on as it would have.
    for a, b in zip(straight, resumed):
        assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"]), (a, b)
    # --dense-mosaics 0: no dense head, so scans average the classifier's head and verify by default.
    for folder in (tmp_path / "u", run_dir):
        model = load_model(folder)
        assert not hasattr(model.module, "dense_head") and "dense_head" not in model.meta
        assert default_verify(model) == VERIFY_CROPS


@pytest.fixture
def unfinished_run(tmp_path) -> tuple[Path, Path]:
    """A tiny run as if stopped after its last checkpoint (its model file back to the best epoch's), and its data."""
    data = make_dataset(tmp_path / "data", per_class=20, size=64)
    code = main(["train", str(data), "--out", str(tmp_path / "runs"), "--name", "r", "--weights", "none",
                 "--input-size", "32", "--head-epochs", "1", "--finetune-epochs", "0", "--views", "1",
                 "--run-length", "5", "--test-fraction", "0", "--dense-mosaics", "0", "--scan-mosaics", "0",
                 "--quiet"])
    assert code == 0
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "model.safetensors").rename(run_dir / "best.safetensors")
    return run_dir, data


def resume_error(run_dir: Path, capsys) -> str:
    code = main(["train", "--resume", str(run_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_resume_refuses_changed_data_and_keeps_the_split_record(unfinished_run, capsys):
    run_dir, data = unfinished_run
    recorded = (run_dir / "split.csv").read_bytes()
    first = sorted((data / "Positive").iterdir())[0]
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "Positive" / "extra.jpg")
    err = resume_error(run_dir, capsys)
    assert "data changed since this run started" in err and "1 new (Positive/extra.jpg)" in err, err
    (data / "Positive" / "extra.jpg").rename(first)  # same name, other pixels
    err = resume_error(run_dir, capsys)
    assert f"started (1 changed (Positive/{first.name}));" in err, err
    assert (run_dir / "split.csv").read_bytes() == recorded


def test_resume_from_a_damaged_checkpoint_or_config_is_a_clear_error(unfinished_run, capsys):
    run_dir, _ = unfinished_run
    config = (run_dir / "config.json").read_text()
    (run_dir / "config.json").write_text(config[: len(config) // 2])
    assert "configuration cannot be read" in resume_error(run_dir, capsys)
    (run_dir / "config.json").write_text(config)
    (run_dir / "checkpoint.safetensors").write_bytes(b"\x08" + b"\0" * 15)
    assert "not a readable training checkpoint" in resume_error(run_dir, capsys)
    atomic_save_tensors(run_dir / "checkpoint.safetensors", {"x": torch.ones(1)}, {META_KEY: json.dumps({"epoch": 1})})
    assert "not a readable training checkpoint" in resume_error(run_dir, capsys)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "checkpoint-before-the-record"])
def test_resume_works_from_another_folder_without_the_pretrained_file(tmp_path, monkeypatch, recorded):
    from safetensors.torch import save_file

    from crackscan.model import build_model, read_meta
    from crackscan.train import read_checkpoint

    work = tmp_path / "work"
    data = make_dataset(work / "data", per_class=20, size=64)
    weights = work / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build_model().state_dict().items() if k.startswith("features.")},
              str(weights))
    monkeypatch.chdir(work)  # relative paths, as a user types them
    assert main(["train", "data", "--out", "runs", "--name", "r", "--weights", "base.safetensors",
                 "--input-size", "32", "--head-epochs", "1", "--finetune-epochs", "0", "--views", "1",
                 "--run-length", "5", "--test-fraction", "0", "--dense-mosaics", "0", "--scan-mosaics", "0",
                 "--quiet"]) == 0
    run_dir = work / "runs" / "r"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"] == str(data.resolve()) and config["weights"] == str(weights.resolve())
    pretrained = read_meta(run_dir / "model.safetensors")["pretrained"]
    (run_dir / "model.safetensors").rename(run_dir / "best.safetensors")  # as if stopped after its last epoch
    weights.unlink()  # the checkpoint holds the base's weights: the file is not needed to go on
    if not recorded:  # as written before checkpoints kept where the base came from
        tensors, doc = read_checkpoint(run_dir / "checkpoint.safetensors")
        doc.pop("pretrained")
        atomic_save_tensors(run_dir / "checkpoint.safetensors", tensors, {META_KEY: json.dumps(doc)})
    monkeypatch.chdir(tmp_path)  # and the run goes on from another folder
    assert main(["train", "--resume", "work/runs/r", "--quiet"]) == 0
    assert read_meta(run_dir / "model.safetensors")["pretrained"] == pretrained
