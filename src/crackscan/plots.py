"""Figures a run leaves behind: curves, sample grids, evaluation plots and the architecture diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

PHASE_COLOURS = {"head": "#dbe9f6", "finetune": "#fde4cf"}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy and loss per epoch, train and validation, with the two phases shaded."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "acc", "Accuracy"), (axes[1], "loss", "Loss")):
        for phase, colour in PHASE_COLOURS.items():
            span = [int(r["epoch"]) for r in history if r["phase"] == phase]
            if span:
                ax.axvspan(min(span) - 0.5, max(span) + 0.5, color=colour, zorder=0)
                ax.text((min(span) + max(span)) / 2, 0.02, "frozen base" if phase == "head" else "fine-tuning",
                        transform=ax.get_xaxis_transform(), ha="center", fontsize=8, color="#555")
        ax.plot(epochs, [float(r[f"train_{key}"]) for r in history], "o-", label="train")
        ax.plot(epochs, [float(r[f"val_{key}"]) for r in history], "s-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training performance")
    _save(fig, path)


def _tile_grid(n: int) -> tuple[int, int]:
    cols = min(8, max(1, n))
    return int(np.ceil(n / cols)), cols


def augmentation_grid(pixels: np.ndarray, path: Path) -> None:
    """A grid of augmented training views, exactly as the network receives them (before normalising)."""
    rows, cols = _tile_grid(len(pixels))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, px in zip(axes.flat, pixels):
        ax.imshow(px)
    fig.suptitle("Augmented training samples", fontsize=10)
    _save(fig, path)


def prediction_grid(
    pixels: np.ndarray,
    y: np.ndarray,
    prob: np.ndarray,
    threshold: float,
    files: Sequence[str],
    classes: Sequence[str],
    crack_index: int,
    path: Path,
    *,
    title: str = "Test predictions",
    limit: int = 32,
) -> None:
    """Images with true label, predicted label and crack probability; errors framed in red."""
    other = next(c for i, c in enumerate(classes) if i != crack_index)
    names = {1: classes[crack_index], 0: other}
    n = min(limit, len(pixels))
    if n == 0:
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, f"{title}: none", ha="center")
        _save(fig, path)
        return
    # Show errors first, then a spread of the rest, so a grid of 32 says something about 3,000.
    pred = (np.asarray(prob) >= threshold).astype(int)
    right = [np.flatnonzero((pred == y) & (y == c)) for c in (1, 0)]
    mixed = [i for pair in zip(*right) for i in pair] + [i for r in right for i in r[min(map(len, right)):]]
    order = np.concatenate([np.flatnonzero(pred != y), np.array(mixed, dtype=int)])[:n]
    rows, cols = _tile_grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        ax.imshow(pixels[i])
        wrong = pred[i] != y[i]
        ax.set_title(f"true {names[int(y[i])]}\npred {names[int(pred[i])]} p={prob[i]:.2f}", fontsize=7,
                     color="red" if wrong else "black")
        if wrong:
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color("red")
                side.set_linewidth(3)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def confusion_plot(confusion: dict[str, int], classes: Sequence[str], crack_index: int, path: Path) -> None:
    other = next(c for i, c in enumerate(classes) if i != crack_index)
    matrix = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    labels = [other, classes[crack_index]]
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    _save(fig, path)


def roc_pr_plots(fpr, tpr, precision, recall, metrics: dict[str, Any], roc_path: Path, pr_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    lo, hi = metrics["roc_auc_ci"]
    ax.plot(fpr, tpr, label=f"AUC {metrics['roc_auc']:.4f} [{lo:.4f}, {hi:.4f}]")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right")
    _save(fig, roc_path)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(recall, precision)
    ax.scatter([metrics["recall"]], [metrics["precision"]], color="red", zorder=3,
               label=f"threshold {metrics['threshold']:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall")
    ax.legend(loc="lower left")
    _save(fig, pr_path)


@torch.no_grad()
def architecture_diagram(model: nn.Module, size: int, unfreeze_from: int, path: Path) -> None:
    """A block diagram: each stage with its output shape and parameters, frozen vs fine-tuned coloured."""
    x = torch.zeros(1, 3, size, size)
    boxes = []
    was_training = model.training
    model.eval()
    for i, block in enumerate(model.features):
        x = block(x)
        params = sum(p.numel() for p in block.parameters())
        kind = "conv stem" if i == 0 else "1x1 conv" if i == len(model.features) - 1 else "inverted residual"
        boxes.append((f"features[{i}] {kind}", tuple(x.shape[1:]), params, "finetune" if i >= unfreeze_from else "frozen"))
    boxes.append(("global average pool", (x.shape[1],), 0, "finetune"))
    head_params = sum(p.numel() for p in model.classifier.parameters())
    boxes.append(("head: dropout + linear", (model.classifier[-1].out_features,), head_params, "head"))
    model.train(was_training)
    colours = {"frozen": "#d9d9d9", "finetune": "#fdb863", "head": "#80b1d3"}
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(boxes) + 1.2))
    for row, (name, shape, params, kind) in enumerate(boxes):
        y = len(boxes) - row
        ax.add_patch(plt.Rectangle((0, y - 0.4), 10, 0.8, color=colours[kind], ec="black", lw=0.5))
        ax.text(0.2, y, name, va="center", fontsize=8)
        ax.text(6.0, y, "x".join(map(str, shape)), va="center", fontsize=8)
        ax.text(9.8, y, f"{params:,}", va="center", ha="right", fontsize=8)
        if row < len(boxes) - 1:
            ax.annotate("", (5, y - 0.6), (5, y - 0.4), arrowprops={"arrowstyle": "->", "lw": 0.5})
    ax.text(0.2, len(boxes) + 0.8, f"input 3x{size}x{size}", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, ["frozen in both phases", "fine-tuned in phase 2", "trained in both phases"],
              loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=8, frameon=False)
    ax.set_xlim(0, 10)
    ax.set_ylim(0.4, len(boxes) + 1.2)
    ax.axis("off")
    ax.set_title("crackscan MobileNetV2 (output shape, parameters)", fontsize=10)
    _save(fig, path)
