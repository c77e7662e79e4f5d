"""A real training run through the CLI on tiny generated images, and what it leaves behind."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGENET_WEIGHTS
from crackscan.cli import main
from crackscan.model import load_model, read_meta
from crackscan.runtime import cpu_name


def weights_arg() -> str:
    # The ImageNet base makes the tiny run learn; without the shared file the run still must work.
    return str(IMAGENET_WEIGHTS) if IMAGENET_WEIGHTS.exists() else "none"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main([
        "train", str(tiny_dataset), "--out", str(out), "--name", "tiny", "--weights", weights_arg(),
        "--input-size", "64", "--head-epochs", "2", "--finetune-epochs", "1", "--views", "2",
        "--run-length", "5", "--quiet",
    ])
    assert code == 0
    return out / "tiny"


def test_run_folder_has_every_output(trained_run):
    for name in ("model.safetensors", "model.json", "checkpoint.safetensors", "history.csv", "curves.png",
                 "architecture.txt", "architecture.png", "augmentations.png", "predictions.png", "split.csv",
                 "skipped.csv", "config.json", "test/metrics.json", "test/confusion.png", "test/roc.png",
                 "test/pr.png", "test/misclassified.png", "test/predictions.csv"):
        assert (trained_run / name).is_file(), name
    events = list((trained_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    for png in ("curves.png", "predictions.png", "architecture.png", "augmentations.png"):
        with Image.open(trained_run / png) as im:
            assert im.size[0] > 200 and im.size[1] > 100


def test_history_shows_both_phases(trained_run):
    with open(trained_run / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["phase"] for r in rows] == ["head", "head", "finetune"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 <= float(r["val_acc"]) <= 1 and float(r["train_loss"]) > 0 and float(r["lr"]) > 0
    summary = (trained_run / "architecture.txt").read_text()
    assert "Trainable" in summary and "features[14:]" in summary


def test_checkpoint_round_trip_and_metadata(trained_run, tiny_dataset):
    model = load_model(trained_run / "model.safetensors")
    meta = read_meta(trained_run / "model.safetensors")
    assert meta["classes"] == ["Negative", "Positive"] and meta["crack_class"] == "Positive"
    assert meta["input_size"] == 64 and len(meta["mean"]) == 3 and 0 <= meta["threshold"] <= 1
    assert meta["training"]["head_epochs"] == 2 and len(meta["split_sha256"]) == 64
    assert "torch" in meta["versions"] and "test" in meta["metrics"]
    import onnxruntime

    assert meta["versions"]["onnxruntime"] == onnxruntime.__version__  # it computes the frozen base's features
    # Kernels follow the processor's instruction sets: the processor is part of what a run depends on.
    assert meta["versions"]["cpu"] == cpu_name() and cpu_name() not in ("", "unknown")
    # The same folder loads too, and a saved copy predicts identically.
    again = load_model(trained_run)
    files = sorted((tiny_dataset / "Positive").glob("*.jpg"))[:4]
    a = [p.probability for p in model.predict(files, backend="torch")]
    b = [p.probability for p in again.predict(files, backend="torch")]
    assert np.allclose(a, b)
    metrics = json.loads((trained_run / "test" / "metrics.json").read_text())
    assert metrics["n"] > 0 and len(metrics["accuracy_ci"]) == 2
    # The run ends by fitting the scan's dense head (2 x 2 cells for 64-px patches), saved with the model.
    assert tuple(model.module.dense_head.weight.shape) == (1, 1280, 2, 2)
    assert meta["dense_head"]["kernel"] == 2 and meta["dense_head"]["mosaics"] >= 2
    # Then it chooses the scan's verdict threshold on photo-sized mosaics, two per validation crack patch here.
    with open(trained_run / "split.csv") as handle:
        val_cracks = sum(1 for r in csv.DictReader(handle) if r["split"] == "val" and r["file"].startswith("Positive"))
    calibration = meta["scan_calibration"]
    assert calibration["photos"] == 2 * val_cracks and calibration["with_crack"] == val_cracks
    assert meta["threshold"] <= meta["scan_threshold"] == model.scan_threshold < 1
    assert "validation split" in meta["scan_threshold_source"]


def test_evaluate_reuses_the_split(trained_run, tiny_dataset, tmp_path, capsys):
    code = main(["evaluate", str(trained_run / "model.safetensors"), str(tiny_dataset),
                 "--split", str(trained_run / "split.csv"), "--out", str(tmp_path / "ev"), "--quiet"])
    assert code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    with open(trained_run / "split.csv") as handle:
        n_test = sum(1 for r in csv.DictReader(handle) if r["split"] == "test")
    assert metrics["n"] == n_test
    assert "accuracy" in capsys.readouterr().out
    for name in ("confusion.png", "roc.png", "pr.png", "misclassified.png"):
        assert (tmp_path / "ev" / name).is_file()


def test_target_recall_is_stored_and_used(trained_run, tiny_dataset, tmp_path):
    model_file = tmp_path / "model.safetensors"  # a copy of the run folder's model and its readable metadata
    model_file.write_bytes((trained_run / "model.safetensors").read_bytes())
    (tmp_path / "model.json").write_bytes((trained_run / "model.json").read_bytes())
    code = main(["evaluate", str(model_file), str(tiny_dataset), "--split", str(trained_run / "split.csv"),
                 "--target-recall", "1.0", "--out", str(tmp_path / "ev"), "--quiet"])
    assert code == 0
    meta = read_meta(model_file)
    assert "target recall 1.0" in meta["threshold_source"]
    # The scan threshold training chose sat above the old threshold: it must not outlive it.
    assert "scan_threshold" in read_meta(trained_run / "model.safetensors") and "scan_threshold" not in meta
    assert load_model(model_file).scan_threshold == meta["threshold"]
    assert json.loads((tmp_path / "model.json").read_text()) == meta  # the readable copy follows
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(meta["threshold"])


def test_scan_threshold_chosen_by_evaluate_is_stored(trained_run, tiny_dataset, tmp_path, capsys):
    model_file = tmp_path / "m.safetensors"
    model_file.write_bytes((trained_run / "model.safetensors").read_bytes())
    args = ["evaluate", str(model_file), str(tiny_dataset), "--out", str(tmp_path / "ev"), "--scan-mosaics", "4"]
    assert main(args) == 2
    assert "--scan-mosaics needs --split" in capsys.readouterr().err
    assert main(args + ["--split", str(trained_run / "split.csv")]) == 0
    assert "scan threshold" in capsys.readouterr().out
    meta = read_meta(model_file)
    assert meta["scan_calibration"]["photos"] == 4 and "split.csv" in meta["scan_threshold_source"]
    assert meta["scan_threshold"] >= meta["threshold"]
    # With --target-recall too, the scan threshold is chosen again above the new threshold.
    assert main(args + ["--split", str(trained_run / "split.csv"), "--target-recall", "1.0"]) == 0
    meta = read_meta(model_file)
    assert "target recall 1.0" in meta["threshold_source"] and meta["scan_threshold"] >= meta["threshold"]
    assert meta["scan_calibration"]["photos"] == 4 and meta["scan_calibration"]["patch_threshold"] == meta["threshold"]


def test_evaluate_that_fails_choosing_thresholds_leaves_the_model_file_as_it_was(trained_run, tiny_dataset, tmp_path,
                                                                               capsys):
    model_file = tmp_path / "m.safetensors"
    model_file.write_bytes((trained_run / "model.safetensors").read_bytes())
    before = model_file.read_bytes()
    # Validation rows without a crack-free patch: the recall threshold can be chosen, the scan threshold cannot.
    lines = (trained_run / "split.csv").read_text().splitlines()
    header = lines[0].split(",")
    kept = [lines[0]] + [line for line in lines[1:]
                         if not (line.split(",")[header.index("split")] == "val"
                                 and line.split(",")[header.index("class")] == "Negative")]
    split = tmp_path / "split.csv"
    split.write_text("\n".join(kept) + "\n")
    code = main(["evaluate", str(model_file), str(tiny_dataset), "--split", str(split), "--target-recall", "0.9",
                 "--scan-mosaics", "4", "--out", str(tmp_path / "ev"), "--quiet"])
    assert code == 2
    assert "the model file was not changed" in capsys.readouterr().err
    assert model_file.read_bytes() == before


def test_offline_without_weights_file_is_a_clear_error(tiny_dataset, tmp_path, capsys, monkeypatch):
    # Point torch's cache at an empty folder: the real download path runs and fails on this offline machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # also fails fast where a network exists
    code = main(["train", str(tiny_dataset), "--out", str(tmp_path), "--quiet", "--input-size", "64", "--run-length", "5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--weights FILE" in err and "Traceback" not in err
    # The one base every installation has offline is named: the shipped model, which works as a base.
    from crackscan.model import default_model_path

    assert str(default_model_path()) in err
    assert main(["train", str(tiny_dataset), "--out", str(tmp_path), "--name", "s", "--quiet", "--input-size", "32",
                 "--run-length", "5", "--weights", str(default_model_path()), "--head-epochs", "1",
                 "--finetune-epochs", "0", "--views", "1", "--dense-mosaics", "0", "--scan-mosaics", "0"]) == 0


def test_cli_defaults_match_the_library_defaults():
    from crackscan.cli import build_parser
    from crackscan.train import TrainConfig

    args = build_parser().parse_args(["train", "DATA"])
    lib = TrainConfig(data="DATA")
    for name in ("input_size", "batch_size", "head_epochs", "finetune_epochs", "head_lr", "finetune_lr",
                 "unfreeze_from", "batchnorm", "views", "patience", "val_fraction", "test_fraction", "seed",
                 "run_length", "weights", "hard_negatives", "dense_mosaics", "scan_mosaics"):
        assert getattr(args, name) == getattr(lib, name), name
    assert (args.crop_scale, args.jitter) == (lib.augment.crop_scale, lib.augment.jitter)


def test_views_are_cached_part_by_part_as_the_head_phase_needs_them(tiny_dataset, tmp_path):
    # The first epoch must wait neither for augmentation nor for the whole training set: view 0 is the
    # decoded images themselves, in a fixed shuffled order, computed one part per head epoch; each
    # augmented view is computed when the head phase first reaches it, after view 0 is complete.
    import numpy as np
    import torch

    from crackscan.data import assign_groups, load_dataset, split_groups
    from crackscan.model import build_model
    from crackscan.train import Trainer, TrainConfig
    from crackscan.transforms import normalize_batch

    config = TrainConfig(data=str(tiny_dataset), input_size=64, views=2, head_epochs=4, finetune_epochs=0,
                         patience=10, hard_negatives=0.0, run_length=5, quiet=True)
    dataset = load_dataset(tiny_dataset, config.input_size, quiet=True)
    assign_groups(dataset, None, config.run_length)
    split_groups(dataset, config.val_fraction, config.test_fraction, config.seed)
    torch.manual_seed(0)
    trainer = Trainer(config, tmp_path, build_model().eval(), dataset)
    trainer.build_caches()
    train_idx = dataset.indices("train")
    n = len(train_idx)
    ready = [trainer.images_at(e) for e in range(4)]
    assert ready == [-(-n * k // 4) for k in (1, 2, 3, 4)] and ready[0] < n
    # The shuffled order holds every training image once, with its label.
    shuffled = trainer.training_pixels(0, n)
    assert sorted(map(bytes, shuffled)) == sorted(map(bytes, dataset.pixels[train_idx]))
    order = [next(i for i in train_idx if np.array_equal(dataset.pixels[i], px)) for px in shuffled]
    assert order != sorted(order)
    assert trainer.y_train.tolist() == dataset.labels(order).tolist()

    assert trainer.views == [] and trainer.head_inputs(1).shape[:2] == (1, ready[0])
    with torch.inference_mode():
        plain = trainer.lower(normalize_batch(shuffled[: ready[0]], (0.485, 0.456, 0.406),
                                              (0.229, 0.224, 0.225)))
        pooled = trainer.upper[:-1](plain)
    # Computed by ONNX Runtime (float16 cache): the eager PyTorch values to rounding.
    assert torch.allclose(trainer._parts[0][0].float(), plain, atol=1e-2, rtol=1e-2)
    assert torch.allclose(trainer.head_inputs(1)[0], pooled, atol=1e-3, rtol=1e-3)

    assert [trainer.views_at(e) for e in range(4)] == [1, 1, 1, 2]
    drawn_from = []
    epoch = trainer._epoch
    trainer._epoch = lambda phase, e, opt, sched, inputs: (drawn_from.append(tuple(inputs.shape[:2])),
                                                           epoch(phase, e, opt, sched, inputs))[1]
    trainer.fit()  # head phase only: all of view 0, then the augmented view, must join during it
    assert drawn_from == [(1, ready[0]), (1, ready[1]), (1, ready[2]), (2, n)]
    assert len(trainer.views) == 2 and trainer.runner is None
    assert torch.allclose(trainer.views[0][: ready[0]].float(), plain, atol=1e-2, rtol=1e-2)
    assert not torch.equal(trainer.views[1], trainer.views[0])
    assert [row["phase"] for row in trainer.history] == ["head"] * 4


def test_hard_negatives_are_drawn_as_their_part_is_needed(tiny_dataset, tmp_path):
    # Drawn copies of training negatives join the training set labelled negative, spread through the
    # shuffled order; the first part of view 0 must not wait for lines drawn on the other parts, and an
    # item's pixels are the same whichever call draws them.
    import numpy as np

    from crackscan.data import assign_groups, load_dataset, split_groups
    from crackscan.model import build_model
    from crackscan.train import Trainer, TrainConfig, _draw_negative

    config = TrainConfig(data=str(tiny_dataset), input_size=64, views=2, head_epochs=4, finetune_epochs=0,
                         hard_negatives=0.5, run_length=5, quiet=True)
    dataset = load_dataset(tiny_dataset, config.input_size, quiet=True)
    assign_groups(dataset, None, config.run_length)
    split_groups(dataset, config.val_fraction, config.test_fraction, config.seed)
    trainer = Trainer(config, tmp_path, build_model().eval(), dataset)
    trainer.build_caches()
    train_idx = dataset.indices("train")
    labels = dataset.labels(train_idx)
    negative = 1 - dataset.crack_index
    n_extra = round(0.5 * int((labels == negative).sum()))
    n = len(train_idx) + n_extra
    assert trainer.n_hard_negatives == n_extra and len(trainer.y_train) == n
    assert int((trainer.y_train == negative).sum()) == int((labels == negative).sum()) + n_extra

    first = trainer.images_at(0)
    drawn_first = int((trainer.train_draw[:first] >= 0).sum())
    assert 0 < drawn_first < n_extra and len(trainer._drawn) == drawn_first  # only the first part's lines

    # Drawn lazily, the training set is what drawing every line up front gave (the code before this
    # was lazy): the negatives chosen, the lines, the shuffled order.
    pixels = dataset.pixels[train_idx]
    pool = np.flatnonzero(labels == negative)
    chosen = np.random.default_rng(config.seed + 17).choice(pool, size=n_extra, replace=False)
    eager = np.concatenate([pixels, np.stack([_draw_negative((pixels[i], int(i)), config.seed) for i in chosen])])
    eager_labels = np.concatenate([labels, np.full(n_extra, negative)])
    order = np.random.default_rng([config.seed, 29]).permutation(n)
    whole = trainer.training_pixels(0, n)
    assert np.array_equal(whole, eager[order]) and trainer.y_train.tolist() == eager_labels[order].tolist()
    assert len(trainer._drawn) == n_extra
    is_drawn = trainer.train_draw >= 0
    assert not any(np.array_equal(whole[k], dataset.pixels[trainer.train_source[k]]) for k in np.flatnonzero(is_drawn))
    # A call for a later range, with nothing kept, gives what the whole-set call gave.
    trainer._drawn.clear()
    assert np.array_equal(trainer.training_pixels(first, n), whole[first:])
    # Once every view is cached, the drawn lines and the ONNX Runtime session are let go.
    trainer.ensure_views(trainer.n_views)
    assert len(trainer.views) == 2 and trainer._drawn is None and trainer.runner is None


def _tiny_train(data, out, *extra):
    return main(["train", str(data), "--out", str(out), "--name", "r", "--weights", weights_arg(), "--input-size", "64",
                 "--head-epochs", "1", "--finetune-epochs", "0", "--run-length", "5", "--quiet", *extra])


def test_ctrl_c_while_fitting_the_dense_head_can_be_finished_with_resume(tiny_dataset, tmp_path, capsys, monkeypatch):
    import crackscan.dense_head

    real_fit = crackscan.dense_head.fit_dense_head

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    monkeypatch.setattr(crackscan.dense_head, "fit_dense_head", interrupted)
    assert _tiny_train(tiny_dataset, tmp_path) == 130
    assert "Finish with: crackscan train --resume" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model.safetensors").exists()
    monkeypatch.setattr(crackscan.dense_head, "fit_dense_head", real_fit)
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    assert load_model(tmp_path / "r").dense_head is not None


def test_a_failed_dense_head_fit_keeps_the_trained_model(tiny_dataset, tmp_path, monkeypatch):
    import crackscan.dense_head

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(crackscan.dense_head, "fit_dense_head", broken)
    with pytest.warns(UserWarning, match="dense head not fitted.*out of memory"):
        assert _tiny_train(tiny_dataset, tmp_path) == 0
    model = load_model(tmp_path / "r")
    assert model.dense_head is None and "dense_head" not in model.meta


@pytest.mark.parametrize("args, message", [
    (["--input-size", "16"], "input size must lie in 32..1024 px, got 16"),
    (["--input-size", "2048"], "input size must lie in 32..1024 px, got 2048"),
    (["--head-epochs", "0", "--finetune-epochs", "0"], "nothing to train"),
])
def test_settings_that_cannot_make_a_model_are_refused_before_training(tiny_dataset, tmp_path, capsys, args, message):
    code = main(["train", str(tiny_dataset), "--out", str(tmp_path), "--name", "r", "--weights", "none", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("option, value", [("--hard-negatives", "5"), ("--hard-negatives", "-0.3"),
                                           ("--crop-scale", "0"), ("--crop-scale", "1.5"), ("--jitter", "2"),
                                           ("--head-lr", "0"), ("--finetune-lr", "nan")])
def test_out_of_range_training_options_are_argument_errors(tiny_dataset, tmp_path, capsys, option, value):
    # --hard-negatives 5 was capped at 100% and a negative value turned the feature off, both without a word.
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tiny_dataset), "--out", str(tmp_path), option, value])
    assert exited.value.code == 2 and f"argument {option}: must" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_run_whose_loss_is_never_finite_says_so(tiny_dataset, tmp_path, capsys):
    # A learning rate this large sends the head's weights and the validation loss to inf/NaN in the first steps.
    code = _tiny_train(tiny_dataset, tmp_path, "--head-lr", "1e30", "--dense-mosaics", "0", "--scan-mosaics", "0")
    err = capsys.readouterr().err
    assert code == 2 and "no epoch reached a finite validation loss" in err and "--head-lr" in err, err
    assert (tmp_path / "r" / "history.csv").is_file() and not (tmp_path / "r" / "model.safetensors").exists()


def test_evaluate_finds_the_crack_folder_of_data_named_otherwise(trained_run, tiny_dataset, tmp_path, capsys):
    model = str(trained_run / "model.safetensors")
    for theirs, ours in (("cracked", "Positive"), ("intact", "Negative")):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / theirs).symlink_to(tiny_dataset / ours)
    out = ["--out", str(tmp_path / "ev"), "--quiet"]
    reference = ["--out", str(tmp_path / "ref"), "--quiet"]
    assert main(["evaluate", model, str(tiny_dataset), *reference]) == 0
    # "cracked" is recognised as the crack class by its name, as in training.
    assert main(["evaluate", model, str(tmp_path / "d"), *out]) == 0
    same = json.loads((tmp_path / "ev" / "metrics.json").read_text())["confusion"]
    assert same == json.loads((tmp_path / "ref" / "metrics.json").read_text())["confusion"]
    # Named with --crack-class when the name says nothing: the wrong folder as crack turns the confusion over.
    (tmp_path / "d" / "cracked").rename(tmp_path / "d" / "a")
    capsys.readouterr()
    assert main(["evaluate", model, str(tmp_path / "d"), *out]) == 2
    assert "--crack-class" in capsys.readouterr().err
    assert main(["evaluate", model, str(tmp_path / "d"), "--crack-class", "a", *out]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["confusion"] == same
    assert main(["evaluate", model, str(tmp_path / "d"), "--crack-class", "intact", *out]) == 0
    flipped = json.loads((tmp_path / "ev" / "metrics.json").read_text())["confusion"]
    assert (flipped["tp"], flipped["tn"], flipped["fp"]) == (same["fp"], same["fn"], same["tp"])


def test_evaluate_does_not_rewrite_the_shipped_model(trained_run, tiny_dataset, tmp_path, capsys, monkeypatch):
    import crackscan.model

    # A copy stands in for the packaged file, so that a regression here cannot rewrite the real one.
    shipped = tmp_path / "weights" / "crack-mobilenetv2.safetensors"
    shipped.parent.mkdir()
    shipped.write_bytes((trained_run / "model.safetensors").read_bytes())
    monkeypatch.setattr(crackscan.model, "default_model_path", lambda: shipped)
    before = shipped.read_bytes()
    for option in (["--target-recall", "0.9"], ["--scan-mosaics", "4"]):
        args = ["evaluate", str(shipped), str(tiny_dataset), "--split", str(trained_run / "split.csv"), *option]
        assert main(args) == 2
        assert "is the model shipped with crackscan" in capsys.readouterr().err
    assert shipped.read_bytes() == before


def test_evaluate_reports_go_beside_the_model_or_here_for_the_shipped_one(trained_run, tiny_dataset, tmp_path,
                                                                          monkeypatch, capsys):
    from crackscan.model import default_model_path

    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(tiny_dataset), "--quiet"]) == 0  # MODEL left out: the shipped one, as elsewhere
    metrics = json.loads((tmp_path / f"eval-{tiny_dataset.name}" / "metrics.json").read_text())
    assert metrics["model"] == str(default_model_path())
    assert not (default_model_path().parent / f"eval-{tiny_dataset.name}").exists()
    # A model without its DATA is said so, not scored as data by the shipped model.
    for model in (trained_run, trained_run / "model.safetensors"):
        capsys.readouterr()
        assert main(["evaluate", str(model)]) == 2
        assert f"{model} is a model: give the DATA to score after it" in capsys.readouterr().err
    # The test rows of a split and the whole folder get reports of their own.
    split = ["--split", str(trained_run / "split.csv")]
    assert main(["evaluate", str(trained_run / "model.safetensors"), str(tiny_dataset), *split, "--quiet"]) == 0
    assert (trained_run / f"eval-{tiny_dataset.name}-test" / "metrics.json").is_file()


def test_a_refused_train_command_says_the_first_thing_wrong_and_leaves_no_run_folder(tiny_dataset, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no ImageNet weights cached: offline they fail
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    out = tmp_path / "runs"
    # A mistyped data folder is named, not the download that could not have helped.
    assert main(["train", str(tmp_path / "dta"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dta: no such folder" in err and "--weights" not in err, err
    assert main(["train", str(tiny_dataset), "--out", str(out), "--quiet"]) == 2  # the weights, then
    assert "--weights FILE" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_evaluate_notes_when_it_scores_the_training_folder_itself(trained_run, tiny_dataset, tmp_path, capsys):
    model = str(trained_run / "model.safetensors")
    assert main(["evaluate", model, str(tiny_dataset), "--out", str(tmp_path / "all")]) == 0
    assert "is the folder this model was trained on" in capsys.readouterr().err
    split = ["--split", str(trained_run / "split.csv")]
    assert main(["evaluate", model, str(tiny_dataset), *split, "--out", str(tmp_path / "test")]) == 0
    assert "trained on" not in capsys.readouterr().err


def test_a_small_folder_of_ordinarily_numbered_files_trains_grouped_by_file(tmp_path, capsys):
    # crack_001.jpg ... crack_030.jpg: one run of 500 numbers per class, too few groups for three splits.
    from conftest import concrete_patch

    rng = np.random.default_rng(4)
    for folder, crack in (("crack", True), ("no_crack", False)):
        (tmp_path / "mine" / folder).mkdir(parents=True)
        for i in range(1, 31):
            concrete_patch(rng, 64, crack).save(tmp_path / "mine" / folder / f"{folder}_{i:03d}.jpg")
    args = ["train", str(tmp_path / "mine"), "--out", str(tmp_path / "runs"), "--weights", "none", "--quiet",
            "--input-size", "32", "--head-epochs", "1", "--finetune-epochs", "0", "--views", "1",
            "--dense-mosaics", "0", "--scan-mosaics", "0"]
    assert main([a for a in args if a != "--quiet"] + ["--name", "r"]) == 0
    out, err = capsys.readouterr()
    assert "warning: runs of 500 consecutive file numbers gave a class fewer groups" in err
    assert "crack class: crack/" in out  # which folder was taken for cracks is said, not left to guess
    meta = read_meta(tmp_path / "runs" / "r" / "model.safetensors")
    assert meta["grouping"].startswith("one group per file")
    split = (tmp_path / "runs" / "r" / "split.csv").read_text()
    assert "crack/file:crack/crack_001.jpg" in split
    # A manifest says how files group: it is never overruled.
    manifest = tmp_path / "groups.csv"
    manifest.write_text("file,group\n" + "".join(f"{f}/{f}_{i:03d}.jpg,{f}\n" for f in ("crack", "no_crack")
                                                 for i in range(1, 31)))
    assert main(args + ["--name", "m", "--groups", str(manifest)]) == 2
    assert "group(s) but the split needs at least 3" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "m").exists()  # a run refused before its first epoch leaves no folder


def test_a_model_no_better_than_the_larger_class_is_called_so():
    from crackscan.evaluate import compute_metrics
    from crackscan.train import chance_warning

    y = np.array([0] * 9 + [1] * 8)
    always_no = compute_metrics(y, np.full(17, 0.1), 0.5)  # 9 of 17 right by answering "no crack" every time
    assert "test ROC-AUC 0.500: this model ranks cracks hardly better than chance" in chance_warning(always_no)
    assert "--weights imagenet" in chance_warning(always_no, "none")
    assert "--weights" not in chance_warning(always_no, "imagenet")
    learned = compute_metrics(y, y * 0.8 + 0.1, 0.5)
    assert chance_warning(learned) is None
    # A threshold chosen for recall may cost accuracy without the model being any worse at ranking.
    strict = compute_metrics(y, y * 0.8 + 0.1, 0.95)
    assert strict["accuracy"] <= 9 / 17 and chance_warning(strict) is None
    # Test rows of one class: nothing to rank, nothing to say.
    assert chance_warning(compute_metrics(np.ones(5, int), np.full(5, 0.9), 0.5)) is None
