"""Train the model that ships inside crackscan, install it in the package and write MODEL_CARD.md.

    .venv/bin/python scripts/ship_model.py                     # train + install + evaluate + card (~5 min, 2 cores)
    .venv/bin/python scripts/ship_model.py --from-run RUN_DIR  # install an existing run's model instead of training

Needs the dev data and the offline ImageNet weights beside the repository (../shared/...), or give
--data and --weights. Every figure in MODEL_CARD.md is read from the run this script makes.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TARGET = ROOT / "src" / "crackscan" / "weights" / "crack-mobilenetv2.safetensors"
MAX_BYTES = 10 * 1024 * 1024
#: The shipped decision threshold: the argmax of the two classes. The card reports the recall and precision
#: it gives on validation and test; users who need another trade-off choose one with --target-recall.
THRESHOLD = 0.5


def train(data: Path, weights: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "crackscan.cli", "train", str(data), "--weights", str(weights), "--out", str(out),
           "--name", "shipped"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "shipped"


def scan_photos(model: Path, photos: Path, out: Path) -> list[dict]:
    """Scan verdicts on the real photos, when they and the scan module are there."""
    if not photos.is_dir():
        return []
    from crackscan.model import load_model
    from crackscan.scan import scan_paths

    summary = scan_paths(load_model(model), sorted(photos.glob("*.jpg")), out, quiet=True)
    return [r.to_dict() for r in summary.results]


def fmt_ci(metrics: dict, name: str) -> str:
    lo, hi = metrics[f"{name}_ci"]
    return f"{metrics[name]:.4f} [{lo:.4f}, {hi:.4f}]"


def install(run: Path) -> None:
    """Copy the run's model into the package with the shipped threshold."""
    from crackscan.model import load_model

    model = load_model(run / "model.safetensors")
    if model.meta.get("threshold") != THRESHOLD and model.meta.pop("scan_threshold", None) is not None:
        # chosen above the run's own threshold: choose it again with `crackscan evaluate --scan-mosaics`
        model.meta.pop("scan_calibration", None)
        print(f"the run's scan threshold was chosen for threshold {model.meta.get('threshold')}, not {THRESHOLD}: dropped")
    model.meta["threshold"] = THRESHOLD
    model.meta["threshold_source"] = "argmax (0.5); recall and precision at it are in MODEL_CARD.md"
    model.meta.pop("metrics", None)  # measured again below, at the shipped threshold, by crackscan evaluate
    model.save(TARGET)
    size = TARGET.stat().st_size
    if size > MAX_BYTES:
        sys.exit(f"model is {size / 1e6:.1f} MB, over the 10 MB limit for the package")
    print(f"installed {TARGET} ({size / 1e6:.1f} MB)")


def evaluate_splits(run: Path, data: Path) -> dict[str, dict]:
    """`crackscan evaluate` of the installed model on the run's validation and test rows."""
    from crackscan.evaluate import evaluate

    return {
        split: evaluate(TARGET, data, run / f"shipped-{split}", split_csv=run / "split.csv", split=split, quiet=True)
        for split in ("val", "test")
    }


def write_card(run: Path, scans: list[dict], data: Path, metrics: dict[str, dict]) -> None:
    from crackscan.model import read_meta

    meta = read_meta(TARGET)
    m = metrics["test"]
    v = metrics["val"]
    cfg = meta["training"]
    counts = {"train": None, "val": v["n"], "test": m["n"]}
    pretrained = meta["pretrained"]
    if pretrained.startswith("file "):  # name the file, not this machine's path to it
        pretrained = f"`{Path(pretrained[5:]).name}` (`../shared/weights/`)"
    with open(run / "shipped-val" / "predictions.csv", newline="") as handle:
        probs = [float(r["crack_probability"]) for r in csv.DictReader(handle)]
    unsure = sum(0.1 <= p < 0.9 for p in probs)
    wall = [s for s in scans if "no-crack" in Path(s["file"]).name]
    wall_line = ""
    if wall and wall[0]["is_crack"]:
        wall_line = (f"\nThe wall photo has no crack: its {len(wall[0]['regions'])} flagged region(s) "
                     f"({wall[0]['flagged_fraction']:.1%} of the photo) are false alarms: look at the overlays "
                     "(RUN/photos/, written by this script) to see on what.\n")
    dense = meta.get("dense_head")
    dense_line = "" if not dense else (
        f"\n- Dense head for whole-photo scans (`crackscan.dense_head`): a {dense['kernel']}×{dense['kernel']} "
        f"convolution over the base's features, fitted after training on {dense['mosaics']} mosaics of training-split "
        f"patches to match the classifier's crops at every map cell. On validation mosaics its map cells are "
        f"flagged as the crops flag them in {dense['val_cell_agreement']:.1%} of cells (the classifier's head "
        f"averaged over each patch's cells: {dense['val_cell_agreement_averaged_head']:.1%}).")
    calibration = meta.get("scan_calibration")
    scan_threshold_line = "" if not calibration else (
        f"\n\n## Scan threshold\n`crackscan scan` judges a photo's map at its own threshold, {meta['scan_threshold']:.2f}: a photo "
        f"is a crack when any of its ~1,900 map cells reaches it, so a patch-level false-alarm rate is multiplied by the "
        f"cells of a photo. It was chosen by `crackscan.calibrate` on {calibration['photos']} photo-sized mosaics of validation patches "
        f"({calibration['grid'][0]}×{calibration['grid'][1]} tiles, half of them with one crack tile): the lowest "
        f"threshold with the best balanced photo accuracy. At {meta['threshold']:.2f} "
        f"{calibration['at_patch_threshold']['crack_free_flagged']} of {calibration['crack_free']} crack-free mosaics "
        f"were flagged and {calibration['at_patch_threshold']['crack_found']} of {calibration['with_crack']} crack tiles "
        f"found; at {meta['scan_threshold']:.2f}, {calibration['at_scan_threshold']['crack_free_flagged']} and "
        f"{calibration['at_scan_threshold']['crack_found']}: the photos it was chosen on, so these figures flatter it; "
        f"the README's Results give the test split's (`benchmarks/mosaic.py --photo-mosaics 200`). "
        f"`crackscan scan --threshold` changes it per scan.")
    with open(run / "split.csv") as handle:
        counts["train"] = sum(1 for line in handle if ",train," in line)
    c = m["confusion"]
    photo_lines = "\n".join(
        f"| `{Path(s['file']).name}` | {'crack' if s['is_crack'] else 'no crack'} | {len(s['regions'])} | "
        f"{s['flagged_fraction']:.2%} | {s.get('seconds', float('nan')):.2f} |"
        for s in scans
    ) or "| (photos not available when the card was written) | | | | |"
    card = f"""# Model card: crackscan shipped crack classifier

`src/crackscan/weights/crack-mobilenetv2.safetensors` ({TARGET.stat().st_size / 1e6:.1f} MB): used by every
crackscan command when no model is named. **A decision aid: it does not replace a professional structural
assessment.** A "no crack" answer does not mean a structure is sound.

All figures below are written by `scripts/ship_model.py` from the run it trains. Rerun on the same processor with
the same packages (the model file's `versions`), it gives the same run to the last digit; on another processor
PyTorch and ONNX Runtime choose other kernels, sums differ in their last bits, and training amplifies that into
another model with similar figures (the README's Results give one such run).

## Model
- Architecture: torchvision MobileNetV2 (width 1.0), new head: dropout {meta['dropout']} + linear 1280 → 2.
- Input: {meta['input_size']}×{meta['input_size']} RGB, ImageNet normalisation (mean {meta['mean']}, std {meta['std']}).
- Classes: {meta['classes']}; crack class `{meta['crack_class']}`.
- Pretrained base: {pretrained}. That file is the ImageNet MobileNetV2 described in
  `../shared/weights/README.md`: the ONNX model zoo's "MobileNet v2-1.0-int8" (Apache-2.0), dequantized and
  mapped onto torchvision's layout, ImageNet top-1 68.3% (zoo figure) versus torchvision's 71.9%. Users with a
  network get torchvision's own `MobileNet_V2_Weights.IMAGENET1K_V1` by default.
- Training: phase 1 (frozen base, head only) up to {cfg['head_epochs']} epochs at lr {cfg['head_lr']}; phase 2
  (features[{cfg['unfreeze_from']}:] + head) up to {cfg['finetune_epochs']} epochs at lr {cfg['finetune_lr']},
  AdamW, cosine schedule, BatchNorm {cfg['batchnorm']}, early stopping on validation loss (best epoch
  {meta['best_epoch']}), augmentation {cfg['augment']}, {cfg['views']} cached views per image (the decoded image, then augmented ones), seed {cfg['seed']}.
  Drawn hard negatives (cables, straight and ragged edges, joints) added for {cfg.get('hard_negatives', 0):.0%} of the
  training negatives. Wall time of this run {meta['train_seconds']:.0f} s (on a 2-core machine that was busy with
  other jobs; `benchmarks/train_speed.py` measures training time alone).{dense_line}

## Data and split
- *Concrete Crack Images for Classification* (Özgenel 2019, Mendeley Data, doi:10.17632/5y9wdsg2zt.2, CC BY 4.0),
  the development subset `mendeley-dev`: 19,160 patches of 227×227, 20 of the 40 blocks of 500 consecutive file
  numbers per class (byte-identical duplicates of the archive removed). The other 20 blocks per class are withheld
  for independent evaluation and were never seen here.
- Split by block ({meta['grouping']}), never by file: train {counts['train']}, validation {counts['val']},
  test {counts['test']} images. Split manifest sha256 `{meta['split_sha256'][:16]}…`.

## Metrics (`crackscan evaluate`, block-held-out test split, {m['n']} images, {m['n_crack']} cracks)
| metric | value [95% CI] |
|---|---|
| accuracy | {fmt_ci(m, 'accuracy')} |
| precision | {fmt_ci(m, 'precision')} |
| recall | {fmt_ci(m, 'recall')} |
| F1 | {fmt_ci(m, 'f1')} |
| ROC-AUC | {fmt_ci(m, 'roc_auc')} |

Confusion at the threshold: tn {c['tn']}, fp {c['fp']}, fn {c['fn']}, tp {c['tp']}. Intervals: {m['ci_method']}.
The withheld blocks may score differently: these blocks came from the same campus, cameras and season.

## Threshold
{meta['threshold']:.2f}: the argmax of the two classes. On the validation split it gives recall {fmt_ci(v, 'recall')}
and precision {fmt_ci(v, 'precision')} ({v['n']} images). The network's probabilities are sharply peaked (ROC-AUC
{v['roc_auc']:.5f} on validation): only {unsure} of the {len(probs)} validation patch(es) score between 0.1 and 0.9, so
any threshold in that range changes at most {unsure} answer(s) there. Change it
per call with `--threshold`, or choose one on your own validation data with
`crackscan evaluate MODEL DATA --split SPLIT.csv --target-recall R`, which stores it in the model file (a copy of
this one: the model shipped with crackscan is never rewritten).{scan_threshold_line}

## Whole photos
`crackscan scan` on the two real 4032×3024 phone photos in `../shared/data/photos/` (patch size 227 px):

| photo | verdict | regions | flagged area | seconds |
|---|---|---|---|---|
{photo_lines}
{wall_line}
## Intended use
Screening photos of concrete surfaces for visible cracks, to direct a qualified inspector's attention; a
second pair of eyes over many photos, not a judge of any one. Works best on photos like the training data:
concrete walls and floors photographed from about 1 m, where one 227-px patch covers a few centimetres.

## Known limits
- Other materials (brick, asphalt, tiles, wood) and coatings were not in the training data.
- Other distances: a patch must see a crack at roughly the training scale; use `--patch-size` for closer or
  farther shots.
- Stains, joints, formwork lines, cables, shadows, hair-like debris and edges can look like cracks (the
  test errors in `predictions.png` include such cases); label noise exists in the dataset itself.
- Plaster broken away at fittings (a socket box, a frame) looks like a crack to it, and to every variant
  trained here: the crack-free wall photo is flagged there (the README's Results). The training negatives are
  bare concrete; they hold nothing of the kind.
- Crack width, depth, activity and structural significance are not estimated.
- Dataset: 458 photos from one campus (METU); lighting, cameras and concrete types beyond it are untested.

## Licence and citations
Model weights: derived from ImageNet-pretrained MobileNetV2 (Apache-2.0 source, see above) and trained on data
under CC BY 4.0; cite the dataset:
1. Özgenel, Ç. F. (2019). Concrete Crack Images for Classification. Mendeley Data, V2. doi:10.17632/5y9wdsg2zt.2
2. Özgenel, Ç. F., & Gönenç Sorguç, A. (2018). Performance comparison of pretrained convolutional neural networks
   on crack detection in buildings. ISARC 2018.
3. Zhang, L., Yang, F., Zhang, Y. D., & Zhu, Y. J. (2016). Road crack detection using deep convolutional neural
   network. IEEE ICIP 2016.
"""
    (ROOT / "MODEL_CARD.md").write_text(card)
    print(f"wrote {ROOT / 'MODEL_CARD.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "mendeley-dev")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_imagenet1k.safetensors")
    parser.add_argument("--photos", type=Path, default=SHARED / "data" / "photos")
    parser.add_argument("--out", type=Path, default=ROOT / "runs")
    parser.add_argument("--from-run", type=Path, metavar="RUN_DIR", help="install this run's model instead of training")
    args = parser.parse_args()
    run = args.from_run or train(args.data, args.weights, args.out)
    install(run)
    metrics = evaluate_splits(run, args.data)
    scans = scan_photos(TARGET, args.photos, run / "photos")
    write_card(run, scans, args.data, metrics)


if __name__ == "__main__":
    main()
