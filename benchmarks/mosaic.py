"""Scan quality: mosaics of real patches with known labels, and the two real photos.

Mosaics: real 227-px patches from ../shared/data/mendeley-dev (blocks not used for training) laid on
a grid, so every tile's label is known. Each mosaic is scanned at patch size 227 (one tile = one
patch) with the dense method (the model's dense head: scan's default; with 256 crops verifying the
borders; and without the dense head, the classifier's head averaged over each patch's cells, verified and
raw) and the crop-by-crop method, and the map is scored per tile:

* centre: the map cell whose patch is best aligned with the tile (at most half a map step away) decides;
* any: the tile counts as flagged when any cell whose patch centre lies inside the tile is flagged.

The reference is the same model classifying each tile's own file (`predict`): what the map would be
if a scan saw the patches exactly as in training.

Photo-sized verdicts: mosaics the size of a phone photo (13 x 17 tiles of 227 px: 2951 x 3859), half of
them crack-free and half with one crack tile at a random place, scanned with scan's default. A photo's
verdict is what an inspector reads first, and a 12-MP photo is ~1,900 map cells: a per-cell false alarm
rate that looks small per patch flags many crack-free photos. Reported: verdicts right, crack-free photos
flagged, crack tiles found by a region over them, regions elsewhere (beyond the cells whose patch can
reach the crack tile), and the largest probability on crack-free photos (the margin below the
threshold); then the same maps judged at other verdict thresholds (``SWEEP``): crack-free photos flagged
and crack tiles found at each, among them the model's patch threshold and its scan threshold (the
verdict's, chosen on validation mosaics like these by ``crackscan.calibrate``; maps and verdicts are judged
at it). To look at such a choice without touching the test split, run it on the validation rows
(``--part val``), on which a calibrated model's scan threshold was chosen. Tile seams are straight edges between two surfaces that the training patches never show, so
these photos are harder than plain concrete there.

Real photos: both photos in ../shared/data/photos are scanned (dense); the verdicts are reported and
the overlays written to benchmarks/results/scan-photos/. The floor photo must flag its crack, the wall
photo (cables, a hard negative) must flag nothing.

Tiles come from the test rows of the model's own split (columns file,class,group,split): --split
RUN/split.csv, or by default the split.csv beside the model (for the shipped model runs/shipped/split.csv)
when its hash is the one the model records. With --blocks B..., from those blocks of blocks.csv instead:
only blocks the model never trained on, which the script cannot check.

    python benchmarks/mosaic.py --model RUN/model.safetensors
    python benchmarks/mosaic.py --split RUN/split.csv --mosaics 8 --grid 8x6
    python benchmarks/mosaic.py --split RUN/split.csv --part val --photo-mosaics 120 --mosaics 1 --no-crops
    python benchmarks/mosaic.py --quick          # one small mosaic, < 60 s
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import scan_options, variant_model, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
DATA = SHARED / "data" / "mendeley-dev"
PHOTOS = SHARED / "data" / "photos"
RESULTS = HERE / "results"
TILE = 227
#: Verdict thresholds the photo-sized mosaics are also judged at (the model's own is reported first).
SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def model_split(model: Any) -> Path | None:
    """The split.csv the model was trained with: beside it, or runs/shipped/ for the shipped model, when its
    sha256 is the one in the model's metadata; None when there is none such."""
    import hashlib

    for candidate in (Path(model.path).parent / "split.csv", HERE.parent / "runs" / "shipped" / "split.csv"):
        if candidate.is_file() and hashlib.sha256(candidate.read_bytes()).hexdigest() == model.meta.get("split_sha256"):
            return candidate
    return None


def tile_files(data: Path, split: Path | None, blocks: tuple[int, ...], part: str = "test") -> dict[str, list[Path]]:
    """Held-out patch files per class name."""
    chosen: dict[str, list[Path]] = {}
    if split is not None:
        with open(split, newline="") as handle:
            for row in csv.DictReader(handle):
                if row["split"] == part:
                    path = Path(row["file"])
                    chosen.setdefault(row["class"], []).append(path if path.is_absolute() else data / path)
    else:
        with open(data / "blocks.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                if int(row["block"]) in blocks:
                    chosen.setdefault(row["class"], []).append(data / row["file"])
    if not chosen:
        sys.exit("no held-out tiles found (check --split / --blocks)")
    return chosen


def paste_tile(image: Image.Image, path: Path, row: int, col: int) -> None:
    """Lay one patch file on the mosaic's tile (row, col)."""
    with Image.open(path) as patch:
        image.paste(patch.convert("RGB").resize((TILE, TILE)), (col * TILE, row * TILE))


def at_network_scale(image: Image.Image, model: Any) -> Image.Image:
    """A mosaic as scan sees it: one 227-px tile to one patch at the model's input size."""
    scale = model.input_size / TILE
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)


def build_mosaic(
    files: dict[str, list[Path]], crack_class: str, rows: int, cols: int, crack_share: float,
    rng: np.random.Generator,
) -> tuple[Image.Image, np.ndarray, list[list[Path]]]:
    """A rows x cols grid of real patches; returns the image, the crack mask and the files used."""
    other = next(c for c in files if c != crack_class)
    labels = rng.random((rows, cols)) < crack_share
    image = Image.new("RGB", (cols * TILE, rows * TILE))
    used: list[list[Path]] = []
    for i in range(rows):
        used.append([])
        for j in range(cols):
            pool = files[crack_class] if labels[i, j] else files[other]
            path = pool[int(rng.integers(len(pool)))]
            paste_tile(image, path, i, j)
            used[i].append(path)
    return image, labels, used


def overlaps(box: Sequence[float], tile: tuple[int, int], margin: int = 0) -> bool:
    """Whether a region's photo-pixel box [x0, y0, x1, y1] overlaps the tile at (row, col) grown by ``margin``."""
    x0, y0 = tile[1] * TILE - margin, tile[0] * TILE - margin
    x1, y1 = x0 + TILE + 2 * margin, y0 + TILE + 2 * margin
    return box[0] < x1 and box[2] > x0 and box[1] < y1 and box[3] > y0


def photo_verdicts(model: Any, files: dict[str, list[Path]], count: int, rng: np.random.Generator,
                   grid: tuple[int, int] = (13, 17)) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scan ``count`` photo-sized mosaics (scan's default), every other one with one crack tile."""
    from crackscan.scan import scan_scaled

    cols, rows = grid
    # The fixed thresholds and the two the model carries: the patch threshold and the scan's verdict threshold.
    sweep = sorted({*SWEEP, model.threshold, model.scan_threshold})
    per_photo = []
    for index in range(count):
        image, _, used = build_mosaic(files, model.crack_class, rows, cols, 0.0, rng)
        crack = None
        if index % 2:
            crack = (int(rng.integers(rows)), int(rng.integers(cols)))
            pool = files[model.crack_class]
            paste_tile(image, pool[int(rng.integers(len(pool)))], *crack)
        result = scan_scaled(model, at_network_scale(image, model), image.size, source=f"photo-mosaic-{index}")
        at = {t: result.with_threshold(t) for t in sweep}
        on_crack = [r for r in result.regions if crack is not None and overlaps(r["box"], crack)]
        # A region's box holds the squares its cells own (a third of a patch); a cell whose patch reaches into
        # the crack tile may own a square up to a patch away from it: only regions beyond that are elsewhere.
        elsewhere = [r for r in result.regions if crack is None or not overlaps(r["box"], crack, TILE)]
        # The crack-free tiles under those regions: what the false alarms are made of.
        under = sorted({used[i][j].name for r in elsewhere for i in range(rows) for j in range(cols)
                        if (i, j) != crack and overlaps(r["box"], (i, j))})
        per_photo.append({
            "crack_tile": list(crack) if crack else None, "verdict": result.label,
            "ok": result.verdict == (crack is not None), "crack_found": bool(on_crack) if crack else None,
            "regions_elsewhere": len(elsewhere), "tiles_under_regions_elsewhere": under,
            "max_probability": round(result.max_probability, 4), "flagged_fraction": round(result.flagged_fraction, 5),
            # The same map judged at other verdict thresholds: flagged at all, and the crack tile found.
            "sweep": {str(t): {"flagged": judged.verdict,
                               "crack_found": any(overlaps(r["box"], crack) for r in judged.regions) if crack else None}
                      for t, judged in at.items()},
        })
        print(f"photo mosaic {index + 1}/{count}: {'one crack tile' if crack else 'crack-free'}, "
              f"{result.label}, max {result.max_probability:.3f}", flush=True)
    from crackscan.evaluate import wilson

    free = [p for p in per_photo if p["crack_tile"] is None]
    cracked = [p for p in per_photo if p["crack_tile"] is not None]
    flagged = sum(p["verdict"] == "crack" for p in free)
    found = sum(bool(p["crack_found"]) for p in cracked)
    summary = {
        "photos": count, "grid": [cols, rows], "verdicts_right": sum(p["ok"] for p in per_photo),
        "crack_free": len(free), "crack_free_flagged": flagged,
        # 95% Wilson intervals of the two rates (photos share tiles from one pool: read them as a guide)
        "crack_free_flagged_ci": [round(float(v), 4) for v in wilson(flagged, len(free))],
        "crack_free_max_probability": max((p["max_probability"] for p in free), default=None),
        "with_crack": len(cracked), "crack_found": found,
        "crack_found_ci": [round(float(v), 4) for v in wilson(found, len(cracked))],
        "regions_elsewhere": sum(p["regions_elsewhere"] for p in per_photo),
        # Tiles most often under a region away from any crack tile, with the photos they were under: a few
        # patches of the pool (mislabelled ones among them) can make most of the false alarms.
        "tiles_most_under_false_regions": Counter(
            name for p in per_photo for name in p["tiles_under_regions_elsewhere"]).most_common(8),
        "sweep": [{"threshold": t, "crack_free_flagged": sum(p["sweep"][str(t)]["flagged"] for p in free),
                   "crack_found": sum(bool(p["sweep"][str(t)]["crack_found"]) for p in cracked)} for t in sweep],
    }
    return summary, per_photo


def tile_scores(result, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile: the best-aligned cell's probability, and the largest probability of cells centred in it."""
    from crackscan.calibrate import tile_cells_max

    centre = np.zeros((rows, cols), np.float32)
    anyone = np.zeros((rows, cols), np.float32)
    r_cells, c_cells = result.map_shape
    ox, oy = result.map_origin
    for i in range(rows):
        for j in range(cols):
            ci = int(np.clip(round((i * TILE - oy) / result.stride), 0, r_cells - 1))
            cj = int(np.clip(round((j * TILE - ox) / result.stride), 0, c_cells - 1))
            centre[i, j] = result.probability[ci, cj]
            anyone[i, j] = tile_cells_max(result, i, j, TILE)
    return centre, anyone


def score(labels: np.ndarray, flagged: np.ndarray) -> dict:
    tp = int((labels & flagged).sum())
    tn = int((~labels & ~flagged).sum())
    return {
        "accuracy": round(float((labels == flagged).mean()), 4),
        "recall": round(tp / max(1, int(labels.sum())), 4),
        "specificity": round(tn / max(1, int((~labels).sum())), 4),
        "tiles": int(labels.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file or run folder (default: the shipped model)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--split", type=Path, help="RUN/split.csv: use its test rows (default: the model's own, "
                                                   "found beside it by its hash)")
    parser.add_argument("--part", default="test", choices=["test", "val"],
                        help="with --split: the rows to use (default test; val to look at choices such as a threshold)")
    parser.add_argument("--blocks", type=int, nargs="+",
                        help="blocks.csv blocks to use instead of a split: only blocks the model never trained on")
    parser.add_argument("--mosaics", type=int, default=4)
    parser.add_argument("--grid", default="8x6", help="COLSxROWS tiles per mosaic (default 8x6)")
    parser.add_argument("--crack-share", type=float, default=0.3, help="share of crack tiles (default 0.3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photo-mosaics", type=int, default=20,
                        help="photo-sized mosaics for verdicts, half crack-free (default 20; 0 skips)")
    parser.add_argument("--no-crops", action="store_true", help="skip the slow crop-by-crop method")
    parser.add_argument("--quick", action="store_true", help="one 4x3 mosaic and the photos: a smoke run")
    args = parser.parse_args()

    from crackscan.model import ModelError, load_model
    from crackscan.runtime import tune_allocator
    from crackscan.scan import render_overlay, scan_paths, scan_scaled

    tune_allocator()
    if not args.data.is_dir():
        sys.exit(f"needs {args.data}")
    try:
        model = load_model(args.model)
    except ModelError as err:
        sys.exit(f"error: {err}")
    cols, rows = (int(v) for v in args.grid.lower().split("x"))
    if args.quick:
        args.mosaics, cols, rows, args.photo_mosaics = 1, 4, 3, 2
    if args.split is None and not args.blocks:
        args.split = model_split(model)
        if args.split is None:  # any other default could hand the benchmark patches the model trained on
            sys.exit("error: no split.csv of this model found beside it: pass --split RUN/split.csv, or --blocks B... "
                     "of blocks it never trained on")
    files = tile_files(args.data, args.split, tuple(args.blocks or ()), args.part)
    rng = np.random.default_rng(args.seed)
    # "dense" is scan's default (the dense head's map); "dense-verify-256" with its borders verified by crops;
    # "averaged-..." without the dense head (the classifier's head averaged over each patch's cells),
    # verified (scan's default before the dense head) and raw.
    methods = ["dense", "dense-verify-256", "averaged-dense", "averaged-dense-raw"] + ([] if args.no_crops else ["crops"])
    models = {method: variant_model(model, method) for method in methods}
    out_dir = RESULTS / "scan-mosaics"
    out_dir.mkdir(parents=True, exist_ok=True)

    labels_all, reference_all = [], []
    per_method: dict[str, dict[str, list]] = {m: {"centre": [], "any": [], "seconds": []} for m in methods}
    for index in range(args.mosaics):
        image, labels, used = build_mosaic(files, model.crack_class, rows, cols, args.crack_share, rng)
        flat = [p for row in used for p in row]
        reference = np.array([p.is_crack for p in model.predict(flat, backend="torch")]).reshape(rows, cols)
        labels_all.append(labels)
        reference_all.append(reference)
        scaled = at_network_scale(image, model)
        for method in methods:
            started = time.perf_counter()
            result = scan_scaled(models[method], scaled, image.size, source=f"mosaic-{index}", **scan_options(method))
            per_method[method]["seconds"].append(time.perf_counter() - started)
            centre, anyone = tile_scores(result, rows, cols)
            per_method[method]["centre"].append(centre >= result.threshold)
            per_method[method]["any"].append(anyone >= result.threshold)
            if index == 0:
                render_overlay(image, result, max_side=1600).save(out_dir / f"mosaic-{index}-{method}.jpg", quality=85)
        print(f"mosaic {index + 1}/{args.mosaics}: {int(labels.sum())} crack tiles of {labels.size}", flush=True)

    labels = np.concatenate([m.ravel() for m in labels_all])
    report_rows = [dict(map="per-patch predict (reference)", **score(labels, np.concatenate([r.ravel() for r in reference_all])))]
    for method in methods:
        for rule in ("centre", "any"):
            flagged = np.concatenate([m.ravel() for m in per_method[method][rule]])
            # Tile by tile against the crop-by-crop map (same rule), not only the same accuracy.
            crops = np.concatenate([m.ravel() for m in per_method["crops"][rule]]) if "crops" in per_method else None
            report_rows.append(dict(map=f"{method} map, {rule} cell", **score(labels, flagged),
                                    same_as_crops=None if crops is None else round(float((flagged == crops).mean()), 4),
                                    seconds_per_mosaic=round(float(np.mean(per_method[method]["seconds"])), 3)))

    verdicts, verdict_photos = photo_verdicts(model, files, args.photo_mosaics, rng) if args.photo_mosaics else ({}, [])

    photos = []
    if PHOTOS.is_dir():
        summary = scan_paths(model, sorted(PHOTOS.glob("*.jpg")), RESULTS / "scan-photos", quiet=True)
        for result in summary.results:
            name = Path(result.source).name
            expected = "no crack" if "no-crack" in name else "crack"
            photos.append({"photo": name, "verdict": result.label, "expected": expected,
                           "ok": result.label == expected, "max_probability": round(result.max_probability, 4),
                           "flagged_fraction": round(result.flagged_fraction, 4), "regions": len(result.regions),
                           "seconds": round(result.seconds, 3)})

    print(f"\nmodel: {model.path}  threshold {model.threshold:.3f} (maps and verdicts at the scan threshold "
          f"{model.scan_threshold:.3f})  tiles from "
          f"{f'{args.split} ({args.part} rows)' if args.split else 'blocks ' + ' '.join(map(str, args.blocks))}")
    print(f"{'map':<40}{'accuracy':>9}{'recall':>8}{'specif.':>8}{'tiles':>7}{'as crops':>9}{'s/mosaic':>9}")
    for row in report_rows:
        print(f"{row['map']:<40}{row['accuracy']:>9.3f}{row['recall']:>8.3f}{row['specificity']:>8.3f}"
              f"{row['tiles']:>7}{'' if row.get('same_as_crops') is None else row['same_as_crops']:>9}"
              f"{row.get('seconds_per_mosaic', ''):>9}")
    if verdicts:
        print(f"photo-sized mosaics ({verdicts['grid'][0]}x{verdicts['grid'][1]} tiles): {verdicts['verdicts_right']} of "
              f"{verdicts['photos']} verdicts right; crack-free flagged {verdicts['crack_free_flagged']} of "
              f"{verdicts['crack_free']} (95% CI {verdicts['crack_free_flagged_ci']}; largest probability "
              f"{verdicts['crack_free_max_probability']}); crack tile found {verdicts['crack_found']} of "
              f"{verdicts['with_crack']} (95% CI {verdicts['crack_found_ci']}); regions elsewhere {verdicts['regions_elsewhere']}")
        print("  tiles most often under false regions (file, photos): " + ", ".join(
            f"{name} {n}" for name, n in verdicts["tiles_most_under_false_regions"]))
        print("  at other verdict thresholds: " + "; ".join(
            f"{row['threshold']}: {row['crack_free_flagged']} flagged, {row['crack_found']} found" for row in verdicts["sweep"]))
    for photo in photos:
        print(f"photo {photo['photo']}: {photo['verdict']} (expected {photo['expected']}) max {photo['max_probability']}, "
              f"{photo['regions']} region(s), {100 * photo['flagged_fraction']:.1f}% flagged")
    report = {
        "quick": args.quick,
        "model": model.path,
        "threshold": model.threshold,
        "scan_threshold": model.scan_threshold,
        "tiles_from": {"split": str(args.split), "part": args.part} if args.split else {"blocks": args.blocks},
        "grid": [cols, rows],
        "mosaics": args.mosaics,
        "crack_share": args.crack_share,
        "photo_verdicts": verdicts,
        "photo_verdict_mosaics": verdict_photos,
        "photos": photos,
        "overlays": str(RESULTS / "scan-photos"),
    }
    name = "mosaic_quick" if args.quick else "mosaic" if args.part == "test" else f"mosaic_{args.part}"
    write_results(name, report_rows, report)  # with the command, time and machine


if __name__ == "__main__":
    main()
