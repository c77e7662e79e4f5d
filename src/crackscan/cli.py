"""The ``crackscan`` command: one verb per job. It parses arguments and calls the library, nothing more.

Exit codes (every verb):
    0  everything asked for was done
    1  done, but some input files failed: could not be read, or their results not written (each reported on
       its own line)
    2  nothing done: bad arguments, or unusable data / model / weights (one-line message)
    130 interrupted (Ctrl-C); a training run can be resumed with --resume
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

DISCLAIMER = "crackscan is a decision aid: it does not replace a professional structural assessment."


def _ranged(convert: Callable[[str], Any], within: Callable[[Any], bool], says: str, name: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, and refuse a value outside ``within`` ("must <says>, got X").
    ``name`` is what argparse calls it when the text does not convert ("invalid NAME value")."""
    def parse(text: str) -> Any:
        value = convert(text)
        if not within(value):  # a NaN is within nothing
            raise argparse.ArgumentTypeError(f"must {says}, got {text}")
        return value

    parse.__name__ = name
    return parse


_positive_int = _ranged(int, lambda v: v > 0, "be a positive integer", "positive integer")
_non_negative_int = _ranged(int, lambda v: v >= 0, "be 0 or a positive integer", "integer")
_port = _ranged(int, lambda v: 0 <= v <= 65535, "be a port number in 0..65535", "port")
_upload_mb = _ranged(float, lambda v: 0.001 <= v <= 10_000, "be a size in MB from 0.001 to 10000", "size")
_learning_rate = _ranged(float, lambda v: 0 < v < float("inf"), "be a positive learning rate", "learning rate")
_crop_area = _ranged(float, lambda v: 0 < v <= 1, "be an area fraction above 0 and at most 1", "fraction")
_share = _ranged(float, lambda v: 0 <= v <= 1, "lie in [0, 1]", "fraction")
_probability = _ranged(float, lambda v: 0.0 <= v <= 1.0, "lie in [0, 1]", "probability")
_fraction = _ranged(float, lambda v: 0.0 <= v < 1.0, "lie in [0, 1)", "fraction")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crackscan",
        description="Find cracks in photos of concrete. " + DISCLAIMER,
        epilog="Exit codes: 0 all done, 1 some input files failed, 2 error (nothing done), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's allocator at its defaults (crackscan tunes it for speed otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a crack classifier on a folder of labelled images",
                       description="Train MobileNetV2 in two phases (frozen base + head, then fine-tuning) and "
                                   "write a run folder with the model, curves, logs and a test evaluation.")
    t.add_argument("data", nargs="?", help="folder with one subfolder per class (e.g. Positive/, Negative/)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished epoch")
    t.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    t.add_argument("--name", help="run folder name (default: train-DATE-TIME)")
    t.add_argument("--weights", default="imagenet",
                   help="pretrained base: 'imagenet' (torchvision download), a local .safetensors/.pth state dict, "
                        "or 'none' to train from scratch (default: imagenet)")
    t.add_argument("--input-size", type=_positive_int, default=96,
                   help="network input size in pixels (default: 96; see benchmarks/input_size.py)")
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--head-epochs", type=_non_negative_int, default=10, help="phase 1 epochs, base frozen (default: 10)")
    t.add_argument("--finetune-epochs", type=_non_negative_int, default=4, help="phase 2 epochs, upper base fine-tuned (default: 4)")
    t.add_argument("--head-lr", type=_learning_rate, default=3e-3, help="phase 1 learning rate (default: 3e-3)")
    t.add_argument("--finetune-lr", type=_learning_rate, default=2e-4)
    t.add_argument("--unfreeze-from", type=int, default=14, help="first features[] block fine-tuned in phase 2")
    t.add_argument("--batchnorm", choices=("frozen", "train"), default="frozen",
                   help="BatchNorm statistics of fine-tuned blocks: keep ImageNet's (frozen) or update them")
    t.add_argument("--views", type=_positive_int, default=2,
                   help="views cached per training image: the image itself, then augmented ones (default: 2)")
    t.add_argument("--hard-negatives", type=_share, default=0.3, metavar="FRACTION",
                   help="add this fraction of the training negatives again with drawn cables, straight or ragged "
                        "edges and joints, labelled no crack (default 0.3; 0 turns it off)")
    t.add_argument("--patience", type=_positive_int, default=2, help="early stopping patience in epochs")
    t.add_argument("--val-fraction", type=_fraction, default=0.15)
    t.add_argument("--test-fraction", type=_fraction, default=0.15)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--crack-class", help="name of the crack class folder (recognised automatically: Positive, crack...)")
    t.add_argument("--groups", metavar="CSV", help="group manifest (file,group) for the split; default: blocks.csv "
                                                   "in the data folder, else runs of numbered file names")
    t.add_argument("--run-length", type=_positive_int, default=500,
                   help="consecutive file numbers per group when no manifest is given (default: 500)")
    t.add_argument("--target-recall", type=_probability,
                   help="choose the decision threshold on validation data to reach this recall")
    t.add_argument("--dense-mosaics", type=_non_negative_int, default=60, metavar="N",
                   help="fit the whole-photo scan's dense head on up to N mosaics of training patches after training "
                        "(default 60, about a minute; 0: none, scan averages the classifier's head)")
    t.add_argument("--scan-mosaics", type=_non_negative_int, default=200, metavar="N",
                   help="choose the scan's verdict threshold on up to N photo-sized mosaics of validation patches "
                        "(default 200, about a minute; 0: scans judge their maps at the patch threshold)")
    t.add_argument("--no-augment", action="store_true", help="train without augmentation")
    t.add_argument("--no-flips", action="store_true")
    t.add_argument("--no-rot90", action="store_true")
    t.add_argument("--crop-scale", type=_crop_area, default=0.7, help="smallest area kept by random crops (1 = no crop)")
    t.add_argument("--jitter", type=_share, default=0.15, help="colour/brightness jitter strength (0 = none)")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")

    e = sub.add_parser("evaluate", help="score a model on labelled images, with confidence intervals and plots")
    e.add_argument("model", nargs="?", metavar="MODEL",
                   help="model file (.safetensors or .onnx) or run folder (default: the shipped model)")
    e.add_argument("data", metavar="DATA", help="folder with one subfolder per class")
    e.add_argument("--split", metavar="SPLIT_CSV", help="a run's split.csv: score only its --subset rows (test)")
    e.add_argument("--subset", default="test", choices=("train", "val", "test"), help="rows of --split to score")
    e.add_argument("--target-recall", type=_probability,
                   help="pick the threshold reaching this recall on --split's validation rows; saved in the model")
    e.add_argument("--scan-mosaics", type=_non_negative_int, default=0, metavar="N",
                   help="choose the scan's verdict threshold on up to N photo-sized mosaics of --split's validation "
                        "rows (200 as in training); saved in the model")
    e.add_argument("--crack-class", help="name of the crack class folder in DATA (default: the model's crack class "
                                         "when DATA has a folder of that name, else recognised: Positive, crack...)")
    e.add_argument("--out", help="report folder (default: MODEL_DIR/eval-DATA, or eval-DATA-SUBSET with --split; "
                                 "in the current folder for the shipped model)")
    e.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    e.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help="classify image files, folders and globs")
    p.add_argument("paths", nargs="+", metavar="PATH", help="[MODEL] then images, folders or glob patterns")
    p.add_argument("--model", help="model file or run folder (default: the shipped model)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--output", "-o", help="write the CSV/JSON here instead of standard output")
    p.add_argument("--threshold", type=_probability, help="override the model's decision threshold")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")

    s = sub.add_parser("scan", help="crack maps and overlays for whole photos")
    s.add_argument("paths", nargs="+", metavar="PATH", help="[MODEL] then photos, folders or glob patterns")
    s.add_argument("--model", help="model file or run folder (default: the shipped model)")
    s.add_argument("--out", default="scans", help="output folder (default: scans)")
    s.add_argument("--patch-size", type=_positive_int,
                   help="side of one classified patch in photo pixels (default: the training scale, 227 px, "
                        "the dataset's patches in its 4032x3024 photos)")
    s.add_argument("--stride", type=_positive_int,
                   help="map step in photo pixels, rounded to a whole number of network cells (32 network px: "
                        "about 76 photo px for the shipped model at --patch-size 227, the default and finest step)")
    s.add_argument("--threshold", type=_probability,
                   help="judge the map at this threshold instead of the model's scan threshold, which was chosen on "
                        "photo-sized validation mosaics (verification stays at the patch threshold)")
    s.add_argument("--method", choices=("dense", "crops"), default="dense",
                   help="dense: one pass of the base over the photo (fast); crops: classify crops one by one")
    s.add_argument("--verify", type=_non_negative_int, metavar="N",
                   help="dense only: classify up to N border cells of the regions flagged at the model's "
                        "threshold as crops, from each region's edge inwards, to trim what the dense map flags "
                        "beside a crack (default: 0 for a model with a dense head, as the shipped one; 256 without)")
    s.add_argument("--map", dest="map_kind", choices=("probability", "gradcam"), default="probability",
                   help="what the overlay shows")
    s.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="what runs the network (auto: ONNX Runtime when installed; torch: PyTorch only, the dense "
                        "pass always in its memory-bounded tiles)")
    s.add_argument("--quiet", action="store_true")

    x = sub.add_parser("explain", help="Grad-CAM heat map of what the model looked at in a patch")
    x.add_argument("paths", nargs="+", metavar="PATH", help="[MODEL] then image files")
    x.add_argument("--model", help="model file or run folder (default: the shipped model)")
    x.add_argument("--out", default="explain", help="output folder (default: explain)")

    xp = sub.add_parser("export", help="export a model to ONNX (optionally int8-quantized)")
    xp.add_argument("model", nargs="?", help="model file or run folder (default: the shipped model)")
    xp.add_argument("--format", choices=("onnx",), default="onnx")
    xp.add_argument("--int8", action="store_true", help="static int8 quantization calibrated on --calibration images")
    xp.add_argument("--calibration", metavar="DIR",
                    help="training images for int8 calibration, both classes (e.g. the training data folder)")
    xp.add_argument("--parity", metavar="DIR", help="images for the PyTorch parity check (default: generated)")
    xp.add_argument("--output", "-o", help="ONNX file to write (default: MODEL_NAME.onnx in the current folder)")

    sv = sub.add_parser("serve", help="web service and page for predictions and photo scans")
    sv.add_argument("--model", help="model file or run folder (default: the shipped model)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_port, default=8000, help="TCP port, 0 for any free one (default: 8000)")
    sv.add_argument("--max-upload-mb", type=_upload_mb, default=30.0,
                    help="largest upload accepted, in MB (default: 30)")
    return parser


def _version() -> str:
    from crackscan import __version__

    return f"crackscan {__version__}"


def _names_model(path: str) -> bool:
    """A .safetensors or .onnx file, or a run folder: what a ``[MODEL]`` argument looks like."""
    where = Path(path)
    return where.suffix in (".safetensors", ".onnx") or (where.is_dir() and (where / "model.safetensors").is_file())


def _split_model(paths: list[str], model: str | None) -> tuple[str | None, list[str]]:
    """``[MODEL] PATH...``: a leading model (see :func:`_names_model`) before other paths is the model."""
    if model is None and len(paths) > 1 and _names_model(paths[0]):
        return paths[0], paths[1:]
    return model, paths


def _err(message: str) -> None:
    print(f"crackscan: error: {message}", file=sys.stderr)


def _image_paths(items: Sequence[str]) -> list[Path]:
    """The files the arguments name (folders searched for images, globs expanded); no file at all is an error."""
    from crackscan.images import IMAGE_SUFFIXES
    from crackscan.predict import expand_paths

    paths = list(expand_paths(items))
    if not paths:
        raise ValueError(f"no image files in {' '.join(map(str, items))} "
                         f"(crackscan reads {' '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _output_folder(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from crackscan.train import TrainConfig, TrainingInterrupted, train
    from crackscan.transforms import Augment

    if args.resume is None and args.data is None:
        _err("give a DATA folder to train on, or --resume RUN_DIR")
        return EXIT_ERROR
    augment = Augment.none() if args.no_augment else Augment(
        flips=not args.no_flips, rot90=not args.no_rot90, crop_scale=args.crop_scale, jitter=args.jitter
    )
    config = TrainConfig(
        data=str(args.data), out=args.out, name=args.name, weights=args.weights, input_size=args.input_size,
        batch_size=args.batch_size, head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs,
        head_lr=args.head_lr, finetune_lr=args.finetune_lr, unfreeze_from=args.unfreeze_from,
        batchnorm=args.batchnorm, views=args.views, hard_negatives=args.hard_negatives, patience=args.patience, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, augment=augment, crack_class=args.crack_class,
        manifest=args.groups, run_length=args.run_length, target_recall=args.target_recall,
        dense_mosaics=args.dense_mosaics, scan_mosaics=args.scan_mosaics, quiet=args.quiet,
    )
    try:
        result = train(config, resume=args.resume)
    except TrainingInterrupted as err:
        _err(str(err))
        return EXIT_INTERRUPTED
    for line in result.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    print(result.run_dir)
    return EXIT_SOME_FAILED if result.skipped else EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from crackscan.evaluate import evaluate

    from crackscan.model import default_model_path, is_shipped_model

    if args.model is None and _names_model(args.data):
        _err(f"{args.data} is a model: give the DATA to score after it (crackscan evaluate MODEL DATA)")
        return EXIT_ERROR
    model_path = Path(args.model) if args.model else default_model_path()
    base = model_path if model_path.is_dir() else model_path.parent
    if is_shipped_model(model_path):
        base = Path.cwd()  # not into the installed package
    name = f"eval-{Path(args.data).resolve().name or 'data'}" + (f"-{args.subset}" if args.split else "")
    out = Path(args.out) if args.out else base / name
    metrics = evaluate(args.model, args.data, out, split_csv=args.split, split=args.subset,
                       target_recall=args.target_recall, scan_mosaics=args.scan_mosaics,
                       crack_class=args.crack_class, backend=args.backend,
                       quiet=args.quiet)
    for name in ("accuracy", "precision", "recall"):
        lo, hi = metrics[f"{name}_ci"]
        print(f"{name:<10} {metrics[name]:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")
    lo, hi = metrics["f1_ci"]
    print(f"{'f1':<10} {metrics['f1']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")
    lo, hi = metrics["roc_auc_ci"]
    print(f"{'roc_auc':<10} {metrics['roc_auc']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")
    c = metrics["confusion"]
    print(f"confusion  tn {c['tn']}  fp {c['fp']}  fn {c['fn']}  tp {c['tp']}  (threshold {metrics['threshold']:.4f}, n {metrics['n']})")
    # A bootstrap of a perfect score gives [1, 1]: say how the intervals were made, so that it is not read as certainty.
    print(f"intervals: {metrics['ci_method']}")
    for line in metrics["skipped_files"]:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"report: {out}")
    return EXIT_SOME_FAILED if metrics["skipped_files"] else EXIT_OK


def _note_a_whole_photo(command: str, source: object, size: Sequence[int], input_size: int, instead: str) -> None:
    """Say on stderr when an image is far larger than a training patch: ``command`` classifies it as one patch."""
    from crackscan.scan import PATCH_SIZE

    width, height = size
    if max(width, height) > 2 * PATCH_SIZE:
        print(f"note: {source} is {width}x{height} px: {command} squeezes it into one {input_size}-px patch; "
              f"for a photo use `{instead}`", file=sys.stderr)


def _check_output_file(target: Path, flag: str = "-o") -> None:
    """Refuse, before any work, an output file that cannot be written in place (an existing file is judged by
    its own permission: e.g. /dev/stdout, or a report in a folder this user may not write to)."""
    why = ("a folder" if target.is_dir()
           else ("permission denied" if not os.access(target, os.W_OK) else None) if target.exists()
           else "no such folder" if not target.parent.is_dir()
           else "permission denied" if not os.access(target.parent, os.W_OK) else None)
    if why:
        raise ValueError(f"{flag} {target}: cannot write a file there ({why})")


def _check_output_replaced(target: Path, flag: str) -> None:
    """Refuse, before any work, an output file written beside itself and renamed into place (as models and
    exports are): what counts is its folder, created when missing, so the nearest folder that exists."""
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    why = ("a folder" if target.is_dir()
           else f"{folder} is not a folder" if not folder.is_dir()
           else "permission denied" if not os.access(folder, os.W_OK | os.X_OK) else None)
    if why:
        raise ValueError(f"{flag} {target}: cannot write a file there ({why})")


def cmd_predict(args: argparse.Namespace) -> int:
    from crackscan.model import load_model
    from crackscan.predict import predict_sources

    model_arg, items = _split_model(args.paths, args.model)
    if args.output:  # said now, not after the whole batch has run
        _check_output_file(Path(args.output))
    model = load_model(model_arg)
    paths = _image_paths(items)
    failures = 0
    rows = []
    table = args.format == "table" and args.output is None
    if table:
        print(f"{'crack_probability':>17}  {'label':<10} file")
    for pred in predict_sources(model, paths, batch_size=args.batch_size, threshold=args.threshold,
                                backend=args.backend):
        if pred.error:
            failures += 1
            print(f"error: {pred.error}", file=sys.stderr)
        if pred.image_size:
            _note_a_whole_photo("predict", pred.source, pred.image_size, model.input_size, "crackscan scan")
        if table:
            if not pred.error:
                print(f"{pred.probability:>17.4f}  {pred.label:<10} {pred.source}", flush=False)
        else:
            rows.append(pred.to_dict())
    if not table:
        if args.format == "json":
            text = json.dumps(rows, indent=2) + "\n"
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=["file", "crack_probability", "label", "error"])
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        if args.output:
            # surrogateescape: a file name that is not valid UTF-8 is written back as its original bytes,
            # as on standard output, instead of failing the whole batch at the end.
            Path(args.output).write_text(text, encoding="utf-8", errors="surrogateescape")
        else:
            sys.stdout.write(text)
    if failures:
        print(f"{failures} file(s) could not be read", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from crackscan.model import load_model
    from crackscan.scan import PATCH_SIZE, scan_paths

    if args.verify is not None and args.method == "crops":
        raise ValueError("--verify re-classifies a dense map's borders: it does not apply to --method crops")
    model_arg, items = _split_model(args.paths, args.model)
    model = load_model(model_arg)
    summary = scan_paths(model, _image_paths(items), _output_folder(args.out),
                         patch_size=PATCH_SIZE if args.patch_size is None else args.patch_size,
                         stride=args.stride, threshold=args.threshold, method=args.method,
                         **({} if args.verify is None else {"verify": args.verify}),
                         map_kind=args.map_kind, quiet=args.quiet, backend=args.backend)
    if summary.errors:
        print(f"{len(summary.errors)} file(s) failed (see above and summary.csv)", file=sys.stderr)
    print(f"results: {summary.out_dir}")
    print(DISCLAIMER)
    return EXIT_SOME_FAILED if summary.errors else EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from crackscan.explain import explain_image
    from crackscan.images import ImageError
    from crackscan.model import load_model
    from crackscan.scan import unique_stem

    model_arg, items = _split_model(args.paths, args.model)
    model = load_model(model_arg)
    model.network("Grad-CAM")  # an ONNX file: one error now, not one per image
    out = _output_folder(args.out)
    failures, used = 0, set()
    for path in _image_paths(items):
        try:
            # Same name in two folders (Mendeley's Positive/ and Negative/ share names): keep both.
            result = explain_image(model, path, out / f"{unique_stem(path, used)}.gradcam.png")
        except ImageError as err:
            failures += 1
            print(f"error: {err}", file=sys.stderr)
            continue
        except Exception as err:  # writing its overlay, or a decoder bug: this file's failure, not the batch's
            failures += 1
            print(f"error: {path}: cannot explain ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        print(f"{result['crack_probability']:.4f}  {result['label']:<10} {path}  -> {result['overlay']}")
        _note_a_whole_photo("explain", path, result["image_size"], model.input_size, "crackscan scan --map gradcam")
    return EXIT_SOME_FAILED if failures else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from crackscan.export import export_onnx
    from crackscan.model import load_model

    if args.int8 and not args.calibration:
        _err("--int8 needs --calibration DIR (a folder of training images)")
        return EXIT_ERROR
    if args.calibration and not args.int8:
        _err("--calibration is for --int8 exports only (an fp32 export needs no calibration): add --int8 or drop it")
        return EXIT_ERROR
    model = load_model(args.model)
    suffix = ".int8.onnx" if args.int8 else ".onnx"
    # Default: the current folder, never inside the installed package where the shipped model lives.
    output = Path(args.output) if args.output else Path(Path(model.path).stem + suffix)
    _check_output_replaced(output, "-o" if args.output else "the output file")  # before the work, not after
    calibration = _image_paths([args.calibration]) if args.calibration else None
    parity = _image_paths([args.parity]) if args.parity else None
    report = export_onnx(model, output, int8=args.int8, calibration=calibration, parity=parity)
    print(json.dumps(report.to_dict(), indent=2))
    print(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB); it matches PyTorch's labels on "
          f"{100 * report.label_agreement:.1f}% of {report.n_parity} {report.parity_images} images", file=sys.stderr)
    return EXIT_SOME_FAILED if report.skipped else EXIT_OK  # each skipped image was reported as it was met


def cmd_serve(args: argparse.Namespace) -> int:
    from crackscan.serve import serve

    serve(args.model, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    return EXIT_OK


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "scan": cmd_scan,
    "explain": cmd_explain,
    "export": cmd_export,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crackscan`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Pillow warns (two lines, no file name) about damaged metadata in files it still decodes, and about
    # large images; crackscan enforces its own size limit and reports each unusable file in one line.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    if args.no_malloc_tuning:
        os.environ["CRACKSCAN_NO_MALLOC_TUNING"] = "1"
    from crackscan.data import DataError
    from crackscan.images import ImageError
    from crackscan.model import ModelError
    from crackscan.runtime import tune_allocator

    tune_allocator()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `crackscan predict ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_OK
    except (DataError, ModelError, ImageError, OSError, ValueError) as err:
        _err(str(err))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
