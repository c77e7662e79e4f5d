"""Honest evaluation: metrics with confidence intervals, curves, the errors, and threshold choice.

Patches from one photo are correlated, so when groups are known the intervals for F1 and ROC-AUC come
from a *cluster* bootstrap (resampling whole groups), and accuracy/precision/recall use Wilson
intervals on the counts (which assume independence and are therefore labelled as such in the JSON).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

Z95 = 1.959963984540054


def wilson(successes: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    denom = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denom
    half = Z95 * np.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _safe_auc(y: np.ndarray, prob: np.ndarray) -> float:
    return float(roc_auc_score(y, prob)) if 0 < y.sum() < len(y) else float("nan")


def bootstrap_ci(
    y: np.ndarray, prob: np.ndarray, pred: np.ndarray, groups: Sequence[str] | None, n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals for F1 and ROC-AUC, resampling groups (or images when none are given).

    Vectorised: each resample is a vector of group multiplicities, so F1 comes from weighted confusion
    counts and ROC-AUC from weighted Mann-Whitney sums over the once-sorted scores (ties count half).
    """
    rng = np.random.default_rng(seed)
    y, prob, pred = np.asarray(y, int), np.asarray(prob, float), np.asarray(pred, int)
    if groups is None:
        unit = np.arange(len(y))
    else:
        _, unit = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_units = int(unit.max()) + 1 if len(unit) else 0
    weights = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n).astype(float)  # n x units
    per_image = weights[:, unit]  # n x images
    tp = per_image @ ((pred == 1) & (y == 1))
    fp = per_image @ ((pred == 1) & (y == 0))
    fn = per_image @ ((pred == 0) & (y == 1))
    denom = 2 * tp + fp + fn
    # A resample with no crack in it and none predicted has no F1 (not 0): left out, as for ROC-AUC below.
    f1 = np.divide(2 * tp, denom, out=np.full_like(tp, np.nan), where=denom > 0)
    order = np.argsort(prob, kind="mergesort")
    scores, labels, w = prob[order], y[order], per_image[:, order]
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # runs of tied scores
    pos = np.add.reduceat(w * (labels == 1), starts, axis=1)
    neg = np.add.reduceat(w * (labels == 0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(1) * neg.sum(1)
    auc = np.divide((pos * (below + 0.5 * neg)).sum(1), pairs, out=np.full(n, np.nan), where=pairs > 0)
    out = {"f1_ci": tuple(np.nanpercentile(f1, [2.5, 97.5]).tolist()) if np.isfinite(f1).any() else (float("nan"),) * 2}
    out["roc_auc_ci"] = (
        tuple(np.nanpercentile(auc, [2.5, 97.5]).tolist()) if np.isfinite(auc).any() else (float("nan"),) * 2
    )
    return out


def compute_metrics(
    y: np.ndarray, prob: np.ndarray, threshold: float, *, groups: Sequence[str] | None = None, n_boot: int = 1000
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and ROC-AUC with 95% intervals, and the confusion matrix.

    Args:
        y: 1 for crack, 0 for no crack.
        prob: Crack probabilities.
        threshold: Probability at or above which an image is called a crack.
        groups: Group (photo/block) of each image, for a cluster bootstrap.
    """
    y = np.asarray(y, dtype=int)
    prob = np.asarray(prob, dtype=float)
    pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel().tolist()
    metrics: dict[str, Any] = {
        "n": int(len(y)),
        "n_crack": int(y.sum()),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "roc_auc": _safe_auc(y, prob),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "accuracy_ci": wilson(tp + tn, len(y)),
        "precision_ci": wilson(tp, tp + fp),
        "recall_ci": wilson(tp, tp + fn),
        "ci_method": "Wilson (accuracy, precision, recall); "
        + ("cluster bootstrap over groups" if groups is not None else "bootstrap over images")
        + f", {n_boot} resamples (F1, ROC-AUC)",
    }
    metrics.update(bootstrap_ci(y, prob, pred, groups, n=n_boot))
    return metrics


def threshold_for_recall(y: np.ndarray, prob: np.ndarray, target: float) -> float:
    """A threshold that flags at least ``target`` of the positives of (validation) data, as few negatives as that
    allows, and lies in the middle of its gap between two scores.

    The highest threshold reaching ``target`` is the score of the positive that just reaches it, and every
    threshold between that score and the next lower score (of either class) gives the same answers on this
    data. The middle of that gap is chosen rather than its top edge: at the edge, a crack that scores a hair
    lower than that positive is missed, and with a confident model whose validation cracks all score 1.0 the
    edge is 1.0 itself.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    y = np.asarray(y, dtype=int)
    prob = np.asarray(prob, dtype=np.float64)
    positives = np.sort(prob[y == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no crack images in the validation data: cannot choose a threshold for recall")
    # This many positives must score >= threshold; the product's rounding error (0.07 * 100 is 7.000000000000001)
    # must not ask for one more.
    k = max(1, int(np.ceil(target * len(positives) - 1e-9)))
    top = positives[k - 1]
    below = prob[prob < top]
    return float((top + below.max()) / 2 if below.size else top / 2)


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    y: np.ndarray,
    prob: np.ndarray,
    files: Sequence[str],
    pixels: np.ndarray | None,
    classes: Sequence[str],
    crack_index: int,
) -> None:
    """metrics.json, predictions.csv, confusion/ROC/PR plots and the gallery of misclassified images."""
    from crackscan import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    threshold = metrics["threshold"]
    with open(out_dir / "predictions.csv", "w", encoding="utf-8") as handle:
        handle.write("file,true_label,crack_probability,predicted_label,correct\n")
        names = {1: classes[crack_index], 0: next(c for i, c in enumerate(classes) if i != crack_index)}
        for f, t, p in zip(files, y, prob):
            pred = int(p >= threshold)
            handle.write(f'"{f}",{names[int(t)]},{p:.6f},{names[pred]},{int(pred == t)}\n')
    plots.confusion_plot(metrics["confusion"], classes, crack_index, out_dir / "confusion.png")
    if 0 < int(np.sum(y)) < len(y):
        fpr, tpr, _ = roc_curve(y, prob)
        precision, recall, _ = precision_recall_curve(y, prob)
        plots.roc_pr_plots(fpr, tpr, precision, recall, metrics, out_dir / "roc.png", out_dir / "pr.png")
    if pixels is not None:
        wrong = np.flatnonzero((prob >= threshold).astype(int) != y)
        plots.prediction_grid(
            pixels[wrong], y[wrong], prob[wrong], threshold, [files[i] for i in wrong], classes, crack_index,
            out_dir / "misclassified.png", title=f"Misclassified: {len(wrong)} of {len(y)}",
        )


def _save_with_thresholds(model: Any) -> None:
    """Save a model whose thresholds changed, and its run folder's readable copy of the metadata with it."""
    model.save(model.path)
    readable = Path(model.path).with_suffix(".json")
    if readable.is_file():  # a run folder's model.json beside model.safetensors
        readable.write_text(json.dumps(model.meta, indent=2))


def evaluate(
    model_path: str | Path | None,
    data: str | Path,
    out_dir: str | Path,
    *,
    split_csv: str | Path | None = None,
    split: str = "test",
    target_recall: float | None = None,
    scan_mosaics: int = 0,
    crack_class: str | None = None,
    backend: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a model on a labelled folder and write the full report to ``out_dir``.

    Args:
        model_path: A model file (None: the shipped model).
        data: A folder with one subfolder per class.
        out_dir: Where metrics.json and the plots go.
        split_csv: A run's split.csv: evaluate only its ``split`` rows (and pick thresholds on its ``val``).
        split: Which split of ``split_csv`` to score.
        target_recall: Choose the threshold reaching this recall on the validation rows of ``split_csv``
            and store it in the model file; needs ``split_csv``.
        scan_mosaics: Choose the scan's verdict threshold on up to this many photo-sized mosaics of the
            validation rows of ``split_csv`` (:mod:`crackscan.calibrate`; after ``target_recall``, whose
            threshold is its floor) and store it in the model file; needs ``split_csv``.
        crack_class: The crack class's folder in ``data``. By default the folder named as the model's crack
            class, else the one recognised as a crack class by its name (``crackscan.data.CRACK_NAMES``).
        backend: Inference backend (see :meth:`crackscan.model.CrackModel.crack_probability`).
    """
    from crackscan.data import DataError, apply_split, load_dataset, read_split
    from crackscan.model import is_shipped_model, load_model

    model = load_model(model_path)
    if (target_recall is not None or scan_mosaics) and is_shipped_model(model.path):
        raise DataError(f"{model.path} is the model shipped with crackscan, which every command uses by default: it "
                        "is not rewritten. Copy it and choose thresholds for the copy (cp ... my-model.safetensors)")
    # An ONNX file can neither scan nor be saved: say so before loading the data.
    if scan_mosaics:
        model.network("choosing a scan threshold")
    if target_recall is not None:
        model.network("saving a threshold in the model")
    if crack_class is None:
        folders = {p.name.lower() for p in Path(data).iterdir() if p.is_dir()} if Path(data).is_dir() else set()
        crack_class = model.crack_class if model.crack_class.lower() in folders else None
    dataset = load_dataset(data, model.input_size, crack_class=crack_class, quiet=quiet)
    if split_csv is not None:
        apply_split(dataset, read_split(split_csv))
        idx = dataset.indices(split)
        if len(idx) == 0:
            raise DataError(f"{split_csv}: no '{split}' rows match files under {data}")
    else:
        idx = np.arange(len(dataset.samples))
        trained_on = model.meta.get("training", {}).get("data")
        if trained_on and Path(trained_on).resolve() == Path(data).resolve() and not quiet:
            print(f"note: {data} is the folder this model was trained on: scores on all of it are not a test of "
                  "it; pass --split RUN/split.csv to score its held-out test rows", file=sys.stderr)
    # Thresholds are chosen first and saved together at the end: a step that fails leaves the model file as it was.
    said: list[str] = []
    if target_recall is not None:
        if split_csv is None:
            raise DataError("--target-recall needs --split RUN/split.csv so the threshold is chosen on validation data")
        val = dataset.indices("val")
        val_prob = model.crack_probability(dataset.pixels[val], backend)
        threshold = threshold_for_recall((dataset.labels(val) == dataset.crack_index).astype(int), val_prob, target_recall)
        model.meta["threshold"] = threshold
        model.meta["threshold_source"] = f"validation split of {Path(split_csv).name}, target recall {target_recall}"
        # A scan threshold was chosen above the old threshold, the new one is its floor: drop it (and choose it
        # again below, when asked), so that scans never judge at a threshold chosen for another patch threshold.
        stale = model.meta.pop("scan_threshold", None) is not None
        model.meta.pop("scan_threshold_source", None)
        model.meta.pop("scan_calibration", None)
        said.append(f"threshold {threshold:.4f} reaches recall {target_recall} on validation; saved in {model.path}")
        if stale and not scan_mosaics:
            said.append("the scan threshold, chosen for the old threshold, was removed: scans judge at the new one "
                        "until --scan-mosaics N chooses another")
    if scan_mosaics:
        if split_csv is None:
            raise DataError("--scan-mosaics needs --split RUN/split.csv so the threshold is chosen on validation data")
        from crackscan.calibrate import calibrate_scan, store

        try:
            calibration = calibrate_scan(model, dataset.pixels, dataset.labels() == dataset.crack_index,
                                         dataset.indices("val"), photos=scan_mosaics, backend=backend,
                                         progress=not quiet, say=lambda *a: None if quiet else print(*a))
        except ValueError as err:
            raise DataError(f"{split_csv}: {err}; the model file was not changed") from None
        store(model, calibration,
              f"{calibration.photos} photo-sized mosaics of the validation split of {Path(split_csv).name}")
        said.append(f"scan threshold {calibration.threshold:.4f} saved in {model.path}")
    if said:
        _save_with_thresholds(model)
        if not quiet:
            print("\n".join(said))
    y = (dataset.labels(idx) == dataset.crack_index).astype(int)
    prob = model.crack_probability(dataset.pixels[idx], backend)
    groups = [dataset.samples[i].group for i in idx] if split_csv is not None else None
    metrics = compute_metrics(y, prob, model.threshold, groups=groups)
    metrics["model"] = model.path
    metrics["data"] = str(data)
    metrics["skipped_files"] = [f"{p.file}: {p.reason}" for p in dataset.problems]
    out = Path(out_dir)
    write_report(out, metrics, y, prob, [dataset.samples[i].rel for i in idx], dataset.pixels[idx], dataset.classes, dataset.crack_index)
    return metrics
