"""The whole-photo scan's own head, distilled from the patch classifier on mosaics of training patches.

Why. ``scan`` runs the convolutional base once over a photo and reads each patch's logit off the feature
cells under it. The classifier's own head (global average pooling, then one linear layer) can be applied to
every cell and averaged over a patch's ``k x k`` cells (:mod:`crackscan.scan`), but in a whole photo those
cells also see the surface around the patch, where a lone crop sees zero padding. That map is generous:
plain surface beside a crack is flagged too (on mosaics of test patches it got 84-92% of tiles right against
99.5-100% for crop by crop, ``benchmarks/mosaic.py``), and scan had to re-classify its regions' borders as
crops to correct it.

What. The dense head is one ``k x k`` convolution from the base's 1280 feature channels to a crack-vs-rest
logit (``k`` cells across a patch: 3 for 96-px patches). Each of the ``k x k`` positions has its own
weights, so it can learn how much a cell near the patch's edge should count. It is fitted so that its
probability at every map cell matches the crop classifier's probability for that cell's patch:

* data: mosaics of training-split patches laid on a grid (unrelated neighbours, cracks that stop at a
  tile's edge); the teacher is the classifier itself on the crop of every map cell, including the cells
  whose patch straddles two or four tiles;
* start: the classifier's head, the same weights at every position divided by ``k * k`` (exactly the
  averaged head); an L2 pull towards that start keeps it there unless the data says otherwise;
* the base is frozen: only ``1280 * k * k + 1`` numbers are fitted, in seconds, from features computed once.

The validation split's mosaics measure it: the share of map cells whose flag (at the model's threshold)
agrees with the crops', for the fitted head and for the averaged head it started from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crackscan.model import FEATURE_DIM, CrackModel, dense_kernel
from crackscan.scan import grid_crops, work_area

#: Side of a fitting mosaic in network pixels (8 x 8 tiles of 96 px).
MOSAIC_SIDE = 768


@dataclass
class DenseHeadFit:
    """A fitted dense head and how well it matches the crops on the validation split's mosaics."""

    weight: torch.Tensor  # 1 x 1280 x k x k
    bias: torch.Tensor  # 1
    agreement: float | None  # share of validation map cells flagged as the crops flag them
    start_agreement: float | None  # the same for the averaged classifier head it started from
    mosaics: int
    seconds: float

    def to_meta(self) -> dict[str, Any]:
        return {
            "kernel": int(self.weight.shape[-1]),
            "mosaics": self.mosaics,
            "val_cell_agreement": self.agreement,
            "val_cell_agreement_averaged_head": self.start_agreement,
            "fit_seconds": round(self.seconds, 1),
        }


def averaged_head(model: CrackModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's head as a dense head: its crack-vs-rest weights, split equally over ``k x k`` cells.

    With two classes this is exact: sigmoid of (crack logit - other logit) is the softmax's crack
    probability. With more, the other classes' mean stands in for the rest, so the fit starts near, not at,
    the averaged map, and the "averaged head" agreement it reports is that approximation's.
    """
    linear = model.network("scan").classifier[-1]
    weight, bias = linear.weight.detach().float(), linear.bias.detach().float()
    others = [i for i in range(weight.shape[0]) if i != model.crack_index]
    k = dense_kernel(model.input_size)
    w = weight[model.crack_index] - weight[others].mean(0)
    b = bias[model.crack_index] - bias[others].mean(0)
    return (w[None, :, None, None] / (k * k)).repeat(1, 1, k, k), b.reshape(1)


def _tiles(size: int) -> int:
    return max(2, round(MOSAIC_SIDE / size))


def mosaic_count(most: int, patches: int, size: int) -> int:
    """At most ``most`` mosaics, and one per mosaic's worth of patches (at least 2 when ``most`` allows):
    a few dozen training images need no sixty mosaics."""
    return min(most, max(2, math.ceil(patches / _tiles(size) ** 2)))


def build_mosaics(pixels: np.ndarray, count: int, rng: np.random.Generator,
                  rows: np.ndarray | None = None) -> np.ndarray:
    """``count`` mosaics of random patches (N x S x S x 3 uint8 at the input size, or only its ``rows``)
    laid edge to edge."""
    tiles, size = _tiles(pixels.shape[1]), pixels.shape[1]
    pool = np.arange(len(pixels)) if rows is None else np.asarray(rows)
    chosen = pool[rng.integers(len(pool), size=(count, tiles, tiles))]
    # N x tiles x tiles x size x size x 3 -> N x (tiles * size) x (tiles * size) x 3
    grid = pixels[chosen].transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(grid.reshape(count, tiles * size, tiles * size, 3))


@torch.inference_mode()
def _features_and_teacher(model: CrackModel, mosaics: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Base features (N x 1280 x h x w, float16) and the crops' crack probability at every map cell,
    over the part of each mosaic a scan's grid covers (:func:`crackscan.scan.work_area`)."""
    net = model.network("dense head")
    features, teacher = [], []
    for mosaic in mosaics:
        work, grid = work_area(mosaic, model.input_size)
        features.append(net.features(model.preprocess(np.ascontiguousarray(work)[None]))[0].half())
        cells = [(i, j) for i in range(grid.rows) for j in range(grid.cols)]
        probability = model.crack_probability(grid_crops(work, grid, cells))
        teacher.append(torch.from_numpy(probability).reshape(grid.rows, grid.cols))
    return torch.stack(features), torch.stack(teacher)


def dense_logit(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The dense head over N x 1280 x h x w features: N x (h - k + 1) x (w - k + 1) crack-vs-rest logits."""
    return F.conv2d(features.float(), weight, bias)[:, 0]


def _agreement(features: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               threshold: float) -> float:
    with torch.inference_mode():
        flagged = torch.sigmoid(dense_logit(features, weight, bias)) >= threshold
    return round(float((flagged == (teacher >= threshold)).float().mean()), 4)


def fit_dense_head(
    model: CrackModel,
    pixels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray | None = None,
    *,
    mosaics: int = 60,
    val_mosaics: int = 8,
    epochs: int = 30,
    batch: int = 8,
    pull: float = 1e-2,
    lr: float = 1e-3,
    seed: int = 0,
    say: Callable[..., None] = lambda *a: None,
) -> DenseHeadFit:
    """Fit the dense head of a trained classifier (see the module's docstring).

    Args:
        model: The trained classifier; its base and head are not changed.
        pixels: Patches at the input size (N x S x S x 3 uint8), e.g. a dataset's, read in place.
        train_rows: The rows of ``pixels`` to build the fitting mosaics from (training split).
        val_rows: The rows for the agreement figures (validation split; None or empty: not measured).
        mosaics: At most this many fitting mosaics, one per mosaic's worth of training patches (60
            mosaics of 8 x 8 96-px patches: about a minute on 2 cores, mostly classifying their crops).
        pull: Weight of the L2 pull towards the averaged head.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    start_weight, start_bias = averaged_head(model)
    mosaics = mosaic_count(mosaics, len(train_rows), model.input_size)
    features, teacher = _features_and_teacher(model, build_mosaics(pixels, mosaics, rng, train_rows))
    target = teacher.clamp(1e-4, 1 - 1e-4)
    weight, bias = start_weight.clone().requires_grad_(True), start_bias.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for first in range(0, len(order), batch):
            chosen = order[first:first + batch]
            loss = F.binary_cross_entropy_with_logits(dense_logit(features[chosen], weight, bias), target[chosen])
            loss = loss + pull * ((weight - start_weight) ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    weight, bias = weight.detach(), bias.detach()
    agreement = start_agreement = None
    if val_rows is not None and len(val_rows) and val_mosaics:
        val_mosaics = mosaic_count(val_mosaics, len(val_rows), model.input_size)
        val_features, val_teacher = _features_and_teacher(model, build_mosaics(pixels, val_mosaics, rng, val_rows))
        agreement = _agreement(val_features, val_teacher, weight, bias, model.threshold)
        start_agreement = _agreement(val_features, val_teacher, start_weight, start_bias, model.threshold)
        say(f"dense head: map cells flagged as the crops flag them on {val_mosaics} validation mosaics: "
            f"{100 * agreement:.1f}% (the averaged classifier head: {100 * start_agreement:.1f}%)")
    return DenseHeadFit(weight=weight, bias=bias, agreement=agreement, start_agreement=start_agreement,
                        mosaics=mosaics, seconds=time.perf_counter() - started)


def attach(network: nn.Module, fit: DenseHeadFit) -> None:
    """Give the network its dense head (saved with it by :func:`crackscan.model.save_model`)."""
    head = nn.Conv2d(FEATURE_DIM, 1, fit.weight.shape[-1])
    with torch.no_grad():
        head.weight.copy_(fit.weight)
        head.bias.copy_(fit.bias)
    network.dense_head = head.eval()
