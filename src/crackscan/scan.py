"""Scan whole photos: a crack-probability map, the flagged regions, an overlay and a verdict.

Scale. The training patches are 227-px crops of 4032x3024 photos, shown to the network at
``model.input_size`` pixels. A scan keeps that scale: one patch of ``patch_size`` photo pixels becomes
``input_size`` network pixels, so the whole photo is decoded (JPEG DCT draft when it shrinks enough) and
resized by ``scale = input_size / patch_size`` before anything else.

Two methods make the map:

* ``"dense"`` runs the convolutional base once over the scaled photo (MobileNetV2's base has an output
  stride of 32) and reads each patch's probability off the ``k x k`` feature cells under it,
  ``k = ceil(input_size / 32)``, with the model's dense head (:mod:`crackscan.dense_head`): a ``k x k``
  convolution fitted after training so that its map matches the crops'. A model without one (trained
  with ``--dense-mosaics 0`` or before it existed) uses its classifier's head: global average pooling
  followed by one linear layer. Both are linear, so they commute: the linear layer is applied to every
  feature cell first (1280 -> a few logits), and a ``k x k`` average of those cell logits is exactly what
  the head computes for the patch covering those cells, except for context: near a patch's border the
  base sees real neighbouring pixels instead of zero padding.
* ``"crops"`` cuts every patch out of the same scaled photo and classifies it on its own: the reference.

That context makes the averaged head's map generous: a plain cell beside a crack sees the crack through
its receptive field and is flagged too (``benchmarks/mosaic.py`` measures it on mosaics of real patches);
the dense head was fitted to undo it. A dense scan can also *verify* its flagged regions from the outside
in (:func:`_verify_borders`): the flagged cells on a region's border are classified as crops, rejected
ones leave the region, and the new border is checked, until every region's border is confirmed or
``verify`` crops were spent. The cost follows the regions' outlines rather than the photo's area. It is
on by default only for models without a dense head (:func:`default_verify`).

Geometry. Map cell ``(i, j)`` is the patch whose top-left corner lies at
``map_origin + (j * stride, i * stride)`` photo pixels and whose side is ``patch_size``. The stride is a
whole number of network cells (32 network pixels, e.g. 56.75 photo pixels for a 128-px model at patch 227),
so a requested ``stride`` is rounded to the nearest such step. For drawing and for areas, each cell owns
the square around its patch's centre, and the outer cells reach to the photo's edges
(:meth:`ScanResult.cell_edges`), so the cells tile the photo exactly.

Speed. A photo of up to :data:`WHOLE_PASS_PIXELS` scaled pixels (a 12-MP photo at the default scale is
2.2 million) runs the base in one ONNX Runtime pass (:func:`crackscan.export.cell_logits_runner`),
faster than PyTorch on 2 cores (``benchmarks/scan.py``), with memory that grows with the photo. Larger photos, or
``backend="torch"``, take the tiled PyTorch pass below, whose memory is bounded.

Memory. In the tiled pass the base runs in three stages, each over overlapping tiles of its input. A tile is read with a
margin as wide as the stage's receptive-field radius and the margin's output is thrown away, so the
tiled result equals one pass over the whole photo (to float rounding; ``tests/test_scan.py`` checks it)
while the largest activation stays under :data:`TILE_VALUES`. Only the small maps between stages are
kept whole. ``benchmarks/scan.py`` measures the peak memory.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from crackscan.images import (
    MAX_PIXELS,
    ImageError,
    ImageSource,
    describe,
    load_image,
    oriented_size,
    read_source,
)
from crackscan.model import (INFERENCE_CHUNK, CrackModel, check_image, check_threshold, dense_kernel, resolve_backend,
                             weights_version)

#: Side of the dataset's patches in photo pixels (227-px crops of 4032x3024 photos): the default scale.
PATCH_SIZE = 227
#: Output stride of MobileNetV2's convolutional base, in network pixels.
NETWORK_STRIDE = 32
#: Crops per batch for the crop-by-crop reference method.
CROP_BATCH = 32
#: Most crops a dense scan classifies to verify the borders of its flagged regions, by default, with a
#: model that has no dense head.
VERIFY_CROPS = 256
METHODS = ("dense", "crops")
MAP_KINDS = ("probability", "gradcam")


@dataclass
class ScanResult:
    """One photo's scan.

    Attributes:
        source: The photo's name (its path, or a description of bytes/streams).
        photo_size: ``(width, height)`` of the photo after its EXIF orientation is applied.
        patch_size: Side of one classified patch, in photo pixels.
        stride: Photo pixels between neighbouring map cells (a whole number of network cells).
        probability: Crack probability per map cell, float32, ``rows x cols``.
        threshold: Cells at or above it are flagged (by default the model's scan threshold).
        scale: Network pixels per photo pixel (``input_size / patch_size``).
        map_origin: Photo coordinates ``(x, y)`` of the top-left corner of cell (0, 0)'s patch.
        method: ``"dense"`` or ``"crops"``.
        head: What turned features into the map: ``"dense"`` (the model's dense head), ``"averaged"`` (the
            classifier's head averaged over each patch's cells: a model without a dense head) or
            ``"classifier"`` (crops, each classified whole).
        verdict: True when at least one cell is flagged.
        flagged_fraction: Share of the photo's area covered by flagged cells.
        regions: Connected groups of flagged cells (8-neighbourhood), strongest first: ``box``
            ``[x0, y0, x1, y1]`` in photo pixels, ``max_probability``, ``mean_probability``, ``cells``,
            ``area_fraction``.
        seconds: Wall time of decoding plus scanning.
        verified: Cells the dense method re-classified as crops (their map values are the crops').
        rejected: Of those, the ones whose crop falls below the model's patch threshold (verification
            always works at that threshold; ``threshold`` then judges the verified map).
    """

    source: str
    photo_size: tuple[int, int]
    patch_size: int
    stride: float
    probability: np.ndarray
    threshold: float
    scale: float
    map_origin: tuple[float, float]
    method: str = "dense"
    head: str = "dense"
    verdict: bool = False
    flagged_fraction: float = 0.0
    regions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    verified: int = 0
    rejected: int = 0

    @property
    def map_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the probability map."""
        return tuple(self.probability.shape)  # type: ignore[return-value]

    @property
    def max_probability(self) -> float:
        return float(self.probability.max()) if self.probability.size else 0.0

    @property
    def label(self) -> str:
        return "crack" if self.verdict else "no crack"

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Photo-pixel box ``(x0, y0, x1, y1)`` of the patch classified for one map cell."""
        x0 = self.map_origin[0] + col * self.stride
        y0 = self.map_origin[1] + row * self.stride
        return x0, y0, x0 + self.patch_size, y0 + self.patch_size

    def cell_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Photo-pixel boundaries (cols + 1 x-edges, rows + 1 y-edges) of the squares the cells own."""
        rows, cols = self.map_shape
        return (
            _edges(cols, self.map_origin[0], self.stride, self.patch_size, self.photo_size[0]),
            _edges(rows, self.map_origin[1], self.stride, self.patch_size, self.photo_size[1]),
        )

    def with_threshold(self, threshold: float) -> "ScanResult":
        """The same map judged at another threshold (verdict, fraction and regions recomputed)."""
        check_threshold(threshold)
        judged = replace(self, threshold=float(threshold))
        judged.verdict, judged.flagged_fraction, judged.regions = _assess(judged)
        return judged

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: everything except the map itself (see :func:`probability_png`)."""
        return {
            "file": self.source,
            "verdict": self.label,
            "is_crack": self.verdict,
            "max_probability": round(self.max_probability, 6),
            "flagged_fraction": round(self.flagged_fraction, 6),
            "threshold": self.threshold,
            "regions": self.regions,
            "photo_size": list(self.photo_size),
            "patch_size": self.patch_size,
            "stride": round(self.stride, 4),
            "scale": round(self.scale, 6),
            "map_shape": list(self.map_shape),
            "map_origin": [round(v, 3) for v in self.map_origin],
            "method": self.method,
            "head": self.head,
            "verified_cells": self.verified,
            "rejected_cells": self.rejected,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class ScanSummary:
    """What :func:`scan_paths` did: one result per photo scanned, one message per file that failed."""

    results: list[ScanResult]
    errors: list[str]
    out_dir: Path


def _edges(n: int, origin: float, stride: float, patch: float, size: int) -> np.ndarray:
    """Boundaries halfway between neighbouring patch centres; the outer ones at the photo's edges."""
    centres = origin + patch / 2 + stride * np.arange(n)
    edges = np.concatenate([[0.0], (centres[:-1] + centres[1:]) / 2, [float(size)]])
    return np.clip(edges, 0.0, float(size))


def label_regions(flagged: np.ndarray) -> np.ndarray:
    """The map's regions: flagged cells touching by a side or a corner share a label (1, 2, ...; 0 elsewhere)."""
    from scipy import ndimage

    return ndimage.label(flagged, structure=np.ones((3, 3), dtype=bool))[0]


def _assess(result: ScanResult) -> tuple[bool, float, list[dict[str, Any]]]:
    """Verdict, flagged area fraction and regions of a map at its threshold."""
    from scipy import ndimage

    flagged = result.probability >= result.threshold
    if not flagged.any():
        return False, 0.0, []
    xs, ys = result.cell_edges()
    area = np.outer(np.diff(ys), np.diff(xs)) / float(result.photo_size[0] * result.photo_size[1])
    labels = label_regions(flagged)
    regions = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        member = labels[rows, cols] == index
        values = result.probability[rows, cols][member]
        regions.append({
            "box": [int(round(xs[cols.start])), int(round(ys[rows.start])),
                    int(round(xs[cols.stop])), int(round(ys[rows.stop]))],
            "max_probability": round(float(values.max()), 6),
            "mean_probability": round(float(values.mean()), 6),
            "cells": int(member.sum()),
            "area_fraction": round(float(area[rows, cols][member].sum()), 6),
        })
    regions.sort(key=lambda r: (-r["max_probability"], -r["cells"]))
    return True, float(area[flagged].sum()), regions


# --------------------------------------------------------------------------------------------- decoding


def decode_scaled(
    source: ImageSource, scale: float, *, max_pixels: int = MAX_PIXELS, max_scaled: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a photo (EXIF applied) and resize it by ``scale``.

    Returns:
        The scaled RGB image and the photo's own ``(width, height)``.

    Raises:
        ImageError: Unreadable, too large, or so small a patch size that the scaled photo would be too large.
    """
    _, scaled, size = _decode(source, scale, max_pixels, max_scaled)
    return scaled, size


def _check_scaled(name: str, size: tuple[int, int], target: tuple[int, int], max_scaled: int) -> None:
    if target[0] * target[1] > max_scaled:
        raise ImageError(name, f"refused: at this patch size the {size[0]}x{size[1]} photo would be scanned "
                               f"at {target[0]}x{target[1]} pixels (at most {max_scaled / 1e6:g} million); "
                               "use a larger patch size")


def _decode(source: ImageSource, scale: float, max_pixels: int = MAX_PIXELS, max_scaled: int | None = None
            ) -> tuple[Image.Image, Image.Image, tuple[int, int]]:
    """:func:`decode_scaled`, plus the decoded image before its resize (for an overlay sharper than the scan)."""
    max_scaled = max_pixels if max_scaled is None else max_scaled
    name = describe(source)
    data = read_source(source, name)
    # Cheap: a PNG's EXIF is not looked for by decoding it twice; when its orientation turns the photo, the
    # decoded pixels below decide (a JPEG's is read from its header, as its reduced decode needs it).
    size = oriented_size(data, cheap=True)
    target = None
    if size is not None:
        target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        _check_scaled(name, size, target, max_scaled)
    # The DCT draft only ever shrinks, and only by 1/2, 1/4 or 1/8 while still covering the target.
    decoded = load_image(data, reduce_to=target if scale < 1 else None, max_pixels=max_pixels, name=name)
    if size is None or target is None:
        size = decoded.size
        target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        _check_scaled(name, size, target, max_scaled)
    elif (decoded.width > decoded.height) != (size[0] > size[1]) and decoded.width != decoded.height:
        # The pixels decide: the header's reading of the orientation can differ from the decoder's (Pillow
        # versions differ in turning TIFFs upright themselves), and the scan must not stretch the photo.
        size = size[::-1]
        target = target[::-1]
    scaled = decoded
    if decoded.size != target:
        # Bilinear with antialiasing, as load_patch resizes the training patches.
        scaled = decoded.resize(target, Image.Resampling.BILINEAR, reducing_gap=None)
    return decoded, scaled, size


# ----------------------------------------------------------------------------------------------- the map


@dataclass(frozen=True)
class _Grid:
    """Where the patches lie in the scaled photo (network pixels)."""

    rows: int
    cols: int
    step: int  # network pixels between cells, a multiple of NETWORK_STRIDE
    window: int  # the patch side in network pixels (the model's input size)
    offset: tuple[int, int]  # (x, y) of cell (0, 0)'s patch in the scaled photo; negative when padded


def _plan(width: int, height: int, window: int, step: int) -> _Grid:
    """As many whole patches as fit, centred in the photo (a photo smaller than a patch gets one)."""

    def axis(size: int) -> tuple[int, int]:
        count = max(1, (size - window) // step + 1)
        used = window + (count - 1) * step
        return count, (size - used) // 2

    cols, x = axis(width)
    rows, y = axis(height)
    return _Grid(rows=rows, cols=cols, step=step, window=window, offset=(x, y))


def crop_edge_padded(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``rgb[y0:y1, x0:x1]`` where the box may reach past the image, padded there by repeating its edge pixels:
    how a scan pads a photo smaller than a patch (a black border would make another patch of it)."""
    x0, y0, x1, y1 = box
    height, width = rgb.shape[:2]
    inner = rgb[max(0, y0):min(height, y1), max(0, x0):min(width, x1)]
    if inner.size == 0:
        return np.zeros((max(1, y1 - y0), max(1, x1 - x0), 3), dtype=np.uint8)
    pad = ((max(0, -y0), max(0, y1 - height)), (max(0, -x0), max(0, x1 - width)), (0, 0))
    return np.pad(inner, pad, mode="edge") if any(pad[0] + pad[1]) else inner


def _work_pixels(scaled: np.ndarray, grid: _Grid) -> np.ndarray:
    """The part of the scaled photo the patches cover (edge-padded when the photo is smaller than a patch)."""
    x, y = grid.offset
    width = grid.window + (grid.cols - 1) * grid.step
    height = grid.window + (grid.rows - 1) * grid.step
    # Only an axis shorter than a patch is padded (its offset is then negative); the other may be longer.
    return crop_edge_padded(scaled, (x, y, x + width, y + height))


def work_area(pixels: np.ndarray, window: int, step: int = NETWORK_STRIDE) -> tuple[np.ndarray, _Grid]:
    """The map's grid over HxWx3 scaled pixels (``window``-px patches every ``step`` px, centred) and the
    pixels it covers: what the dense pass runs over and crops are cut from (:func:`grid_crops`)."""
    grid = _plan(pixels.shape[1], pixels.shape[0], window, step)
    return _work_pixels(pixels, grid), grid


_FUSED: "weakref.WeakKeyDictionary[nn.Module, list[_Stage]]" = weakref.WeakKeyDictionary()

# The base is run in three stages, cut where the activation that has to be kept whole between stages is
# smallest: after features[3] (24 channels at 1/4 resolution: 1.5 values per network pixel) and after
# features[13] (96 channels at 1/16: 0.375 per pixel). Within a stage, activations are up to 24 values
# per network pixel, so only the stages are tiled.
_STAGE_STARTS = (0, 4, 14)


@dataclass(frozen=True)
class _Stage:
    """A slice of the base, run tile by tile."""

    module: nn.Module
    stride: int  # output pixels are this many input pixels apart
    margin: int  # output pixels of context each tile needs per side: its receptive-field radius, rounded up
    values_per_pixel: float  # largest activation inside the stage, in values per input pixel


def _describe_stage(module: nn.Module) -> _Stage:
    """Stride, receptive-field margin and peak activation size of a chain of convolutions.

    Residual additions never widen the receptive field of the chain they bypass, so walking the
    convolutions in order is enough for MobileNetV2.
    """
    stride, radius, peak = 1, 0, 0.0
    for conv in (m for m in module.modules() if isinstance(m, nn.Conv2d)):
        radius += (conv.kernel_size[0] // 2) * conv.dilation[0] * stride
        stride *= conv.stride[0]
        peak = max(peak, conv.in_channels / (stride // conv.stride[0]) ** 2, conv.out_channels / stride**2)
    return _Stage(module=module, stride=stride, margin=math.ceil(radius / stride), values_per_pixel=peak)


def _stages(model: CrackModel) -> list[_Stage]:
    """The base with every BatchNorm folded into its convolution (same output, ~25% faster), in stages.

    Cached per loaded network: a scan never changes the model, and training builds a new CrackModel.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    network = model.network("scan")
    stages = _FUSED.get(network)
    if stages is None:
        fused = copy.deepcopy(network.features).eval()
        for parent in fused.modules():
            children = list(parent.named_children())
            for (name, conv), (bn_name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(parent, name, fuse_conv_bn_eval(conv, bn))
                    setattr(parent, bn_name, nn.Identity())
        fused.requires_grad_(False).to(memory_format=torch.channels_last)
        bounds = list(_STAGE_STARTS) + [len(fused)]
        stages = [_describe_stage(fused[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        _FUSED[network] = stages
    return stages


def _split(total: int, most: int) -> list[tuple[int, int]]:
    """``[0, total)`` in near-equal consecutive pieces of at most ``most``."""
    pieces = max(1, math.ceil(total / max(1, most)))
    bounds = [round(i * total / pieces) for i in range(pieces + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def plan_tiles(rows: int, cols: int, margin: int, budget: int) -> list[tuple[int, int, int, int]]:
    """Tile cores ``(r0, r1, c0, c1)`` covering a ``rows x cols`` output, each under ``budget`` pixels
    with ``margin`` pixels added per side.

    Full-width strips when a strip at least 8 pixels high fits (fewest seams), else squares.
    """
    if (cols + 2 * margin) * (min(rows, 8) + 2 * margin) <= budget:
        most_cols = cols
    else:
        most_cols = max(1, math.isqrt(budget) - 2 * margin)
    width = min(cols, most_cols) + 2 * margin
    most_rows = max(1, budget // width - 2 * margin)
    return [(r0, r1, c0, c1) for r0, r1 in _split(rows, most_rows) for c0, c1 in _split(cols, most_cols)]


def _run_tiled(
    stage: _Stage,
    read: Callable[[int, int, int, int], torch.Tensor],
    size: tuple[int, int],
    max_values: int,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run a stage over an input of ``size`` (h, w) tile by tile; ``read(y0, y1, x0, x1)`` gives input tiles.

    Every tile is read with ``stage.margin`` output pixels of context per side (clipped at the image
    border, where the whole-image pass pads with zeros too) and starts on a multiple of the stride, so
    the kept centre equals the whole-image result exactly.
    """
    height, width = size
    s, m = stage.stride, stage.margin
    rows, cols = math.ceil(height / s), math.ceil(width / s)
    budget = max(1, int(max_values / stage.values_per_pixel) // (s * s))  # in output pixels
    out: torch.Tensor | None = None
    for r0, r1, c0, c1 in plan_tiles(rows, cols, m, budget):
        y0, x0 = max(0, r0 - m), max(0, c0 - m)
        tile = stage.module(read(y0 * s, min(height, (r1 + m) * s), x0 * s, min(width, (c1 + m) * s)))
        if post is not None:
            tile = post(tile)
        if out is None:
            out = torch.empty((1, tile.shape[1], rows, cols)).contiguous(memory_format=torch.channels_last)
        out[:, :, r0:r1, c0:c1] = tile[:, :, r0 - y0:r1 - y0, c0 - x0:c1 - x0]
    assert out is not None
    return out


#: Largest activation a tile may produce, in float32 values (4 bytes each). A tile's working set is
#: about twice that: a 50-MP photo scans within ~0.3 GB above the process's baseline.
TILE_VALUES = 32_000_000


def cell_weights(model: CrackModel) -> torch.Tensor:
    """What the base's features meet at every cell, as a 1x1 convolution's weight: M x 1280 x 1 x 1.

    With a dense head (:mod:`crackscan.dense_head`), its ``k x k`` positions, position-major (M = k * k;
    :func:`_dense_map` adds each position's output from its own cell). Without, the classifier's linear
    layer (M = classes), whose cell outputs are averaged.
    """
    network, head = model.network("scan"), model.dense_head
    if head is None:
        return network.classifier[-1].weight.detach().float()[:, :, None, None]
    weight = head.weight.detach().float()[0]  # 1280 x k x k
    return weight.permute(1, 2, 0).reshape(-1, weight.shape[0])[:, :, None, None]


@torch.inference_mode()
def cell_logits(model: CrackModel, pixels: np.ndarray, *, max_values: int = TILE_VALUES) -> torch.Tensor:
    """:func:`cell_weights` at every feature cell of an HxWx3 uint8 image: M x ceil(H/32) x ceil(W/32).

    The base runs stage by stage, each stage in tiles with enough context that the result equals one
    pass over the whole image, while memory stays bounded by ``max_values``.
    """
    first, *rest = _stages(model)
    weight = cell_weights(model)

    def read_pixels(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return model.preprocess(np.array(pixels[y0:y1, x0:x1])[None])  # a writable copy of the tile

    out = _run_tiled(first, read_pixels, pixels.shape[:2], max_values)
    for index, stage in enumerate(rest):
        previous = out

        def read_map(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            return previous[:, :, y0:y1, x0:x1].contiguous(memory_format=torch.channels_last)

        last = index == len(rest) - 1
        # The last stage's 1280 channels go through the head as soon as a tile is done.
        out = _run_tiled(stage, read_map, tuple(previous.shape[2:]), max_values,
                         post=(lambda t: F.conv2d(t, weight)) if last else None)
    return out[0]


#: Largest scaled photo, in network pixels, whose base runs in one ONNX Runtime pass: a 12-MP photo at
#: the default scale is 2.2 million. The pass needs ~0.19 KB per network pixel (0.41 GB for a 12-MP
#: photo, measured), so this caps it near 0.5 GB; larger photos take the tiled PyTorch pass.
WHOLE_PASS_PIXELS = 2_600_000

#: Per network: its whole-image ONNX graph's runner, and the weights_version it was exported from.
_WHOLE_PASS: "weakref.WeakKeyDictionary[nn.Module, tuple[Callable[[np.ndarray], np.ndarray], tuple]]" = (
    weakref.WeakKeyDictionary())


def dense_logits(model: CrackModel, pixels: np.ndarray, backend: str = "auto", *,
                 whole_pass_pixels: int = WHOLE_PASS_PIXELS, max_values: int = TILE_VALUES) -> torch.Tensor:
    """:func:`cell_logits`, in one ONNX Runtime pass when ``backend`` resolves to ONNX Runtime and the
    image has at most ``whole_pass_pixels`` pixels (faster on 2 cores); tiled PyTorch otherwise.
    The two agree to float rounding (``tests/test_scan.py``)."""
    network = model.network("scan")
    if resolve_backend(backend) == "onnx" and pixels.shape[0] * pixels.shape[1] <= whole_pass_pixels:
        version = weights_version(network)
        run, made_from = _WHOLE_PASS.get(network, (None, None))
        if run is None or made_from != version:  # exported again when the weights changed since
            from crackscan.export import cell_logits_runner

            run = cell_logits_runner(model)
            _WHOLE_PASS[network] = run, version
        return torch.from_numpy(run(pixels))
    # ONNX Runtime keeps a pass's memory pooled in its session for the next one; a photo too large for a
    # pass lets that session go first, so that the tiled pass's bound holds in a long-lived process too.
    _WHOLE_PASS.pop(network, None)
    return cell_logits(model, pixels, max_values=max_values)


def _dense_map(model: CrackModel, work: np.ndarray, grid: _Grid, backend: str = "auto", **tiling: Any) -> np.ndarray:
    logits = dense_logits(model, work, backend, **tiling)
    # A patch's own feature map is ceil(window / 32) cells a side (each stride-2 layer pads); round() would
    # pool 2 cells for an 80-px patch (round half to even) and give the map an extra row and column.
    cells, step = dense_kernel(grid.window), grid.step // NETWORK_STRIDE
    network, head = model.network("scan"), model.dense_head
    if head is None:
        pooled = F.avg_pool2d(logits[None], cells, stride=step)[0]
        pooled = pooled + network.classifier[-1].bias.detach().float()[:, None, None]
        probability = torch.softmax(pooled, dim=0)[model.crack_index]
    else:
        assert head.weight.shape[-1] == cells, (tuple(head.weight.shape), cells)  # load_model checks files
        # Position (dy, dx) of the head's kernel reads the cell dy rows and dx columns into the patch.
        span = lambda first, count: slice(first, first + (count - 1) * step + 1, step)  # noqa: E731
        total = head.bias.detach().float()[0] + sum(
            logits[dy * cells + dx, span(dy, grid.rows), span(dx, grid.cols)]
            for dy in range(cells) for dx in range(cells))
        probability = torch.sigmoid(total)
    probability = probability.numpy().astype(np.float32)
    assert probability.shape == (grid.rows, grid.cols), (probability.shape, grid)
    return probability


def grid_crops(work: np.ndarray, grid: _Grid, cells: Sequence[tuple[int, int]]) -> np.ndarray:
    """The patches of some map cells, N x window x window x 3 (``work`` and ``grid`` from :func:`work_area`)."""
    w, s = grid.window, grid.step
    return np.stack([work[i * s:i * s + w, j * s:j * s + w] for i, j in cells])


def _verify_borders(model: CrackModel, work: np.ndarray, grid: _Grid, probability: np.ndarray, threshold: float,
                    budget: int, backend: str = "auto") -> tuple[int, int]:
    """Re-classify flagged cells as crops, from each region's border inwards; updates ``probability``.

    A round takes the flagged, unverified cells with an unflagged neighbour (8-neighbourhood; outside the
    map counts as unflagged) and puts their crop probability in the map. Cells the crops reject are
    unflagged, which exposes the cells behind them to the next round. It ends when every border is
    confirmed or ``budget`` crops were used. Rounds go from the outside in, so a spent budget leaves
    interiors unverified; within the last round the weakest cells (the likeliest to be rejected) go first.

    Returns:
        ``(verified, rejected)`` cell counts.
    """
    from scipy import ndimage

    verified = np.zeros(probability.shape, dtype=bool)
    rejected, ring = 0, np.ones((3, 3), dtype=bool)
    while budget > int(verified.sum()):
        flagged = probability >= threshold
        # border_value=1: beyond the map's edge counts as unflagged, so a map flagged everywhere is
        # peeled from its edges too.
        border = flagged & ~verified & ndimage.binary_dilation(~flagged, structure=ring, border_value=1)
        rows, cols = np.nonzero(border)
        if not len(rows):
            break
        weakest = np.argsort(probability[rows, cols], kind="stable")[: budget - int(verified.sum())]
        cells = list(zip(rows[weakest], cols[weakest]))
        for start in range(0, len(cells), INFERENCE_CHUNK):  # crops are cut batch by batch: bounded memory
            chunk = cells[start:start + INFERENCE_CHUNK]
            for (i, j), value in zip(chunk, model.crack_probability(grid_crops(work, grid, chunk), backend)):
                probability[i, j] = value
                verified[i, j] = True
                rejected += int(value < threshold)
    return int(verified.sum()), rejected


def _crops_map(model: CrackModel, work: np.ndarray, grid: _Grid, backend: str = "auto") -> np.ndarray:
    probability = np.empty(grid.rows * grid.cols, dtype=np.float32)
    cells = [(i, j) for i in range(grid.rows) for j in range(grid.cols)]
    for start in range(0, len(cells), CROP_BATCH):
        chunk = cells[start:start + CROP_BATCH]
        probability[start:start + len(chunk)] = model.crack_probability(grid_crops(work, grid, chunk), backend)
    return probability.reshape(grid.rows, grid.cols)


def default_verify(model: CrackModel) -> int:
    """Verification crops a dense scan spends when not told: none with a dense head, whose map matches
    the crops' on mosaics as well as a verified one (``benchmarks/mosaic.py``) and is faster without them
    (``benchmarks/scan.py``); :data:`VERIFY_CROPS` without."""
    model.network("scan")  # an ONNX file cannot scan: say so here too
    return 0 if model.dense_head is not None else VERIFY_CROPS


def _check(patch_size: int, stride: int | None, threshold: float | None, method: str, verify: int | None = None) -> None:
    if verify is not None and verify < 0:
        raise ValueError(f"verify must be a number of crops, 0 or more, got {verify}")
    if patch_size < 8:
        raise ValueError(f"patch size must be at least 8 photo pixels, got {patch_size}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be a positive number of photo pixels, got {stride}")
    check_threshold(threshold)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use {' or '.join(METHODS)}")


def scan_scaled(
    model: CrackModel,
    scaled: Image.Image | np.ndarray,
    photo_size: tuple[int, int],
    *,
    patch_size: int = PATCH_SIZE,
    stride: int | None = None,
    threshold: float | None = None,
    method: str = "dense",
    verify: int | None = None,
    source: str = "<image>",
    backend: str = "auto",
    **tiling: Any,
) -> ScanResult:
    """Scan a photo that is already decoded and scaled by ``model.input_size / patch_size``.

    :func:`scan_photo` decodes and calls this; callers that keep the decoded image (the overlay, the web
    service) use it directly. ``backend`` runs the network: the crops, the crop method's and verification's
    (see :meth:`CrackModel.crack_probability`), and the dense pass (:func:`dense_logits`); ``tiling`` passes
    ``whole_pass_pixels`` and ``max_values`` to :func:`dense_logits`.
    """
    _check(patch_size, stride, threshold, method, verify)
    started = time.perf_counter()
    if isinstance(scaled, Image.Image):
        pixels = np.asarray(scaled.convert("RGB"))
    else:
        pixels = check_image(scaled)
    scale = model.input_size / patch_size
    cells = 1 if stride is None else max(1, round(stride * scale / NETWORK_STRIDE))
    work, grid = work_area(pixels, model.input_size, cells * NETWORK_STRIDE)
    threshold = float(model.scan_threshold if threshold is None else threshold)
    verified = rejected = 0
    if method == "dense":
        probability = _dense_map(model, work, grid, backend, **tiling)
        if verify is None:
            verify = default_verify(model)
        if verify:
            # At the model's own threshold whatever the caller judges at, so that the map, and what the
            # web page's slider redraws from it, is one map: scan(threshold=t) == scan().with_threshold(t).
            verified, rejected = _verify_borders(model, work, grid, probability, model.threshold, verify, backend)
    else:
        probability = _crops_map(model, work, grid, backend)
    # Photo-pixel geometry from the actual resize ratio (it differs from ``scale`` by rounding only).
    ratio_x, ratio_y = photo_size[0] / pixels.shape[1], photo_size[1] / pixels.shape[0]
    result = ScanResult(
        source=source,
        photo_size=(int(photo_size[0]), int(photo_size[1])),
        patch_size=int(patch_size),
        stride=grid.step / scale,
        probability=probability,
        threshold=threshold,
        scale=scale,
        map_origin=(grid.offset[0] * ratio_x, grid.offset[1] * ratio_y),
        method=method,
        head="classifier" if method == "crops" else "averaged" if model.dense_head is None else "dense",
        seconds=time.perf_counter() - started,
        verified=verified,
        rejected=rejected,
    )
    return result.with_threshold(result.threshold)


def scan_photo(
    model: CrackModel,
    source: ImageSource,
    *,
    patch_size: int = PATCH_SIZE,
    stride: int | None = None,
    threshold: float | None = None,
    method: str = "dense",
    verify: int | None = None,
    max_pixels: int = MAX_PIXELS,
    backend: str = "auto",
    whole_pass_pixels: int = WHOLE_PASS_PIXELS,
) -> ScanResult:
    """Crack-probability map, regions and verdict for one photo.

    Args:
        model: A loaded classifier.
        source: A path, the file's bytes or a binary stream; the EXIF orientation is honoured.
        patch_size: Side of one classified patch in photo pixels (227: the scale of the training patches).
        stride: Photo pixels between map cells; rounded to a whole number of network cells (32 network
            pixels). Default: one cell.
        threshold: Flag cells at or above this probability (default: the model's scan threshold,
            :attr:`CrackModel.scan_threshold`).
        method: ``"dense"`` (one pass of the base, fast) or ``"crops"`` (every patch classified alone).
        verify: Dense method only: at most this many crops re-classify the borders of the regions
            flagged at the model's patch threshold (:func:`_verify_borders`); 0 keeps the raw dense map;
            None: :func:`default_verify`.
        max_pixels: Refuse photos, and scaled photos, larger than this (decompression-bomb guard).
        backend: What runs the network: ``"auto"``, ``"onnx"`` or ``"torch"``, as in
            :meth:`CrackModel.crack_probability`. With ONNX Runtime, the dense pass over a photo of up to
            :data:`WHOLE_PASS_PIXELS` scaled pixels is one ONNX Runtime pass; larger photos, and
            ``"torch"``, take the tiled PyTorch pass.
        whole_pass_pixels: The most scaled pixels the dense pass runs in one ONNX Runtime pass (0: always tiled).

    Raises:
        ImageError: The photo cannot be read, or is too large.
        ValueError: A bad argument.
    """
    _check(patch_size, stride, threshold, method, verify)
    started = time.perf_counter()
    scaled, photo_size = decode_scaled(source, model.input_size / patch_size, max_pixels=max_pixels)
    result = scan_scaled(model, scaled, photo_size, patch_size=patch_size, stride=stride, threshold=threshold,
                         method=method, verify=verify, source=describe(source), backend=backend,
                         whole_pass_pixels=whole_pass_pixels)
    result.seconds = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------ images

# Anchor colours of the heat scale (dark purple -> red -> yellow), interpolated linearly.
_RAMP = np.array([[40, 11, 84], [120, 28, 109], [196, 55, 84], [240, 110, 40], [252, 190, 40], [252, 255, 164]],
                 dtype=np.float32)
REGION_COLOUR = (255, 32, 32)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB uint8 on the overlay's colour scale."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(position.astype(np.int64), len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac + 0.5).astype(np.uint8)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at a pixel size (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


#: Overlays of smaller images are enlarged to this longest side, so that the legend's verdict fits.
MIN_OVERLAY_SIDE = 480


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    """The image shrunk to ``max_side``, or enlarged (pixels kept sharp) to :data:`MIN_OVERLAY_SIDE`."""
    longest = max(image.size)
    if longest < MIN_OVERLAY_SIDE <= max_side:
        factor = MIN_OVERLAY_SIDE / longest
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        return image.convert("RGB").resize(size, Image.Resampling.NEAREST)
    factor = max_side / longest
    if factor >= 1:
        return image if image.mode == "RGB" else image.convert("RGB")
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _cell_index(edges: np.ndarray, n_pixels: int, photo_extent: int) -> np.ndarray:
    """For each output pixel along an axis, the map cell that owns it."""
    centres = (np.arange(n_pixels) + 0.5) * (photo_extent / n_pixels)
    return np.clip(np.searchsorted(edges, centres, side="right") - 1, 0, len(edges) - 2)


def render_overlay(
    photo: Image.Image, result: ScanResult, *, heatmap: np.ndarray | None = None, max_side: int = 2048
) -> Image.Image:
    """The photo with flagged cells tinted, regions outlined, and a legend band with the verdict.

    Args:
        photo: The photo at any resolution (the scaled one from :func:`decode_scaled` will do), oriented
            as ``result.photo_size``.
        result: Its scan.
        heatmap: Optional map in [0, 1] over the whole photo (any resolution), drawn instead of the
            probability map, e.g. Grad-CAM from :func:`crackscan.explain.gradcam_map_for_photo`.
        max_side: Longest side of the photo part of the output.
    """
    base = _fit(photo, max_side)
    width, height = base.size
    if heatmap is None:
        # Colour and opacity per map cell, then spread to the pixels each cell owns: a few thousand cells
        # are coloured instead of millions of pixels.
        xs, ys = result.cell_edges()
        cols = _cell_index(xs, width, result.photo_size[0])
        rows = _cell_index(ys, height, result.photo_size[1])
        opacity = np.where(result.probability >= result.threshold, 128, 0).astype(np.uint8)  # half
        colour = heat_colours(result.probability)[rows][:, cols]
        mask = opacity[rows][:, cols]
    else:
        heat = Image.fromarray(np.clip(np.asarray(heatmap, np.float32), 0, 1), mode="F")
        values = np.asarray(heat.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
        levels = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)  # 256 colour steps: no banding to see
        colour = heat_colours(np.linspace(0.0, 1.0, 256))[levels]
        mask = np.rint(levels * 0.65).astype(np.uint8)  # opacity 0.65 at probability 1
    # composite: colour where the mask is 255, the photo where it is 0, linear between.
    image = Image.composite(Image.fromarray(colour, "RGB"), base, Image.fromarray(mask, "L"))

    draw = ImageDraw.Draw(image)
    fx, fy = width / result.photo_size[0], height / result.photo_size[1]
    line = max(2, round(max(width, height) / 400))
    for region in result.regions:
        x0, y0, x1, y1 = region["box"]
        draw.rectangle([x0 * fx, y0 * fy, x1 * fx - 1, y1 * fy - 1], outline=REGION_COLOUR, width=line)
    return _with_legend(image, result, gradcam=heatmap is not None)


def shown(probability: float, digits: int = 3) -> str:
    """A probability for people: rounded down, so that 0.9998 never reads as a threshold of 1.000 reached."""
    return f"{math.floor(probability * 10**digits) / 10**digits:.{digits}f}"


def _with_legend(image: Image.Image, result: ScanResult, *, gradcam: bool) -> Image.Image:
    """A dark band under the image: the verdict, the colour scale with the threshold marked, and a key."""
    width = image.width
    text_size = max(11, min(32, width // 70))
    pad = text_size // 2
    band = Image.new("RGB", (width, pad * 3 + int(text_size * 4.4)), (24, 24, 24))
    draw = ImageDraw.Draw(band)
    big, small = font(int(text_size * 1.2)), font(text_size)
    if result.verdict:
        verdict = (f"CRACK: {len(result.regions)} region(s), {100 * result.flagged_fraction:.1f}% of the photo "
                   f"flagged, max {shown(result.max_probability)}")
        colour = (255, 90, 90)
    else:
        verdict = f"NO CRACK: no cell reaches {result.threshold:.2f} (max {shown(result.max_probability)})"
        colour = (120, 220, 120)
    draw.text((pad, pad), verdict, fill=colour, font=big)

    # Colour scale 0..1 with the threshold marked, then the key on its own line.
    bar_y = pad * 2 + int(text_size * 1.3)
    bar_h = int(text_size * 0.9)
    bar_w = max(60, min(width // 3, 500))
    ramp = heat_colours(np.linspace(0, 1, bar_w))[None].repeat(bar_h, axis=0)
    band.paste(Image.fromarray(ramp, "RGB"), (pad, bar_y))
    tick = pad + round(result.threshold * (bar_w - 1))
    draw.line([(tick, bar_y - 3), (tick, bar_y + bar_h + 2)], fill=(255, 255, 255), width=max(2, text_size // 8))
    draw.text((2 * pad + bar_w, bar_y - text_size // 10), "0 .. 1", fill=(230, 230, 230), font=small)
    what = "Grad-CAM heat x probability" if gradcam else f"crack probability (tinted at >= {result.threshold:.2f})"
    method = result.method + (f", {result.verified} border cells checked as crops" if result.verified else "")
    key = f"{what}; patch {result.patch_size} px, step {result.stride:.0f} px, {method}; boxes: flagged regions"
    draw.text((pad, bar_y + bar_h + pad), key, fill=(230, 230, 230), font=small)

    out = Image.new("RGB", (width, image.height + band.height))
    out.paste(image, (0, 0))
    out.paste(band, (0, image.height))
    return out


def probability_png(result: ScanResult) -> bytes:
    """The map as an 8-bit grayscale PNG, one pixel per cell: value / 255 is the crack probability."""
    gray = np.clip(np.round(result.probability * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def contact_sheet(items: Sequence[tuple[str, Image.Image]], *, thumb: int = 360, columns: int = 4) -> Image.Image:
    """Thumbnails of overlays on a grid, each captioned with its name."""
    columns = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / columns)
    caption = 22
    thumbs = []
    for name, image in items:
        copy_ = image.copy()
        copy_.thumbnail((thumb, thumb))
        thumbs.append((name, copy_))
    cell_h = max(t.height for _, t in thumbs) + caption
    sheet = Image.new("RGB", (columns * (thumb + 8) + 8, rows * (cell_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    small = font(14)
    for index, (name, image) in enumerate(thumbs):
        x = 8 + (index % columns) * (thumb + 8)
        y = 8 + (index // columns) * (cell_h + 8)
        sheet.paste(image, (x, y))
        draw.text((x, y + image.height + 3), name[:48], fill=(0, 0, 0), font=small)
    return sheet


# ---------------------------------------------------------------------------------------------- batches

SHEET_THUMB = 360
OVERLAY_SIDE = 2048


def _overlay_photo(path: Path, decoded: Image.Image, photo_size: tuple[int, int]) -> Image.Image:
    """The overlay's photo: the scan's own decode when sharp enough, else the photo decoded again for it."""
    # Sharp enough: 3/4 of the overlay's side, so a 4032x3024 JPEG's half-size draft (2016 px) serves.
    wanted = min(OVERLAY_SIDE, max(photo_size))
    if max(decoded.size) < 0.75 * wanted:
        factor = wanted / max(photo_size)
        decoded = load_image(path, reduce_to=(round(photo_size[0] * factor), round(photo_size[1] * factor)))
    return _fit(decoded, OVERLAY_SIDE)


SUMMARY_FIELDS = ["file", "verdict", "flagged_fraction", "n_regions", "max_probability", "seconds", "overlay", "error"]


#: Longest output stem, in bytes: a stem, a "_123" for a repeated name and ".overlay.jpg" fit the 255 bytes most
#: file systems allow a name.
MAX_STEM_BYTES = 200


def unique_stem(path: Path, used: set[str]) -> str:
    """``path``'s stem (cut to :data:`MAX_STEM_BYTES`), or ``stem_2``, ``stem_3``... when an earlier file of the
    batch took it (``used``)."""
    stem, n = path.stem or "image", 2
    while len(os.fsencode(stem)) > MAX_STEM_BYTES:
        stem = stem[:-1]
    candidate = stem
    while candidate in used:  # same name in two folders: keep both
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def scan_paths(
    model: CrackModel,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    patch_size: int = PATCH_SIZE,
    stride: int | None = None,
    threshold: float | None = None,
    method: str = "dense",
    verify: int | None = None,
    map_kind: str = "probability",
    quiet: bool = False,
    backend: str = "auto",
) -> ScanSummary:
    """Scan photos and write, for each, ``<stem>.overlay.jpg``, ``<stem>.map.png`` and ``<stem>.json``.

    Also writes ``summary.csv`` (one row per file, failures included) and, for more than one photo,
    ``contact_sheet.jpg``. A file that cannot be read is reported on standard error (one line naming it
    and the reason) and skipped; the batch goes on.

    Args:
        model: A loaded classifier.
        paths: Photo paths (see :func:`crackscan.predict.expand_paths` for folders and globs).
        out_dir: Output folder, created when missing.
        patch_size: Side of one classified patch in photo pixels.
        stride: Photo pixels between map cells (default: one network cell).
        threshold: Flag cells at or above it (default: the model's scan threshold).
        method: ``"dense"`` or ``"crops"``.
        verify: Dense method only: at most this many crops re-classify the borders of the regions
            flagged at the model's patch threshold (:func:`_verify_borders`); 0 keeps the raw dense map;
            None: :func:`default_verify`.
        map_kind: What the overlay shows: ``"probability"`` or ``"gradcam"``.
        quiet: No per-photo progress line on standard output.
        backend: What runs the network (see :func:`scan_photo`).
    """
    _check(patch_size, stride, threshold, method, verify)
    resolve_backend(backend)  # a bad name fails once, before any file
    model.network("scan")  # once, before any file: an ONNX-only model cannot scan
    if map_kind not in MAP_KINDS:
        raise ValueError(f"unknown map kind {map_kind!r}: use {' or '.join(MAP_KINDS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[ScanResult] = []
    errors: list[str] = []
    rows: list[dict[str, Any]] = []
    sheet: list[tuple[str, Image.Image]] = []
    used: set[str] = set()
    if not quiet:
        said = ("--threshold" if threshold is not None else "the model's scan threshold" if "scan_threshold" in
                model.meta else "the model's threshold")
        print(f"cells flagged at {model.scan_threshold if threshold is None else threshold:.3f} ({said})", flush=True)
    for path in paths:
        path = Path(path)
        started = time.perf_counter()
        try:
            decoded, scaled, photo_size = _decode(path, model.input_size / patch_size)
            decode_seconds = time.perf_counter() - started
            # Made before the scan, so that a full-size decode (a PNG) is not held while the scan runs.
            photo = _overlay_photo(path, decoded, photo_size)
            del decoded
            scan_started = time.perf_counter()
            result = scan_scaled(model, scaled, photo_size, patch_size=patch_size, stride=stride,
                                 threshold=threshold, method=method, verify=verify, source=str(path),
                                 backend=backend)
            result.seconds = decode_seconds + time.perf_counter() - scan_started  # decoding plus scanning
            heat = None
            if map_kind == "gradcam":
                from crackscan.explain import gradcam_map_for_photo

                heat = gradcam_map_for_photo(model, scaled, result)
            overlay = render_overlay(photo, result, heatmap=heat)
        except ImageError as err:
            message = str(err)
        except Exception as err:  # e.g. a decoder bug or memory for one odd photo: name the file, go on
            message = f"{path}: cannot scan ({type(err).__name__}: {err})"
        else:
            stem = unique_stem(path, used)
            record = result.to_dict() | {"overlay": f"{stem}.overlay.jpg", "map": f"{stem}.map.png",
                                         "map_kind": map_kind}
            if min(result.map_origin) < 0:  # the grid starts outside the photo: it was padded
                record["note"] = (f"{photo_size[0]}x{photo_size[1]} px is smaller than one {patch_size}-px patch on "
                                  f"at least one side: the patch was filled out by repeating the edge pixels; a single "
                                  f"patch is better classified by `crackscan predict`, a photo taken closer needs a "
                                  f"smaller --patch-size")
            try:
                overlay.save(out_dir / f"{stem}.overlay.jpg", quality=88)
                (out_dir / f"{stem}.map.png").write_bytes(probability_png(result))
                (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
            except OSError as err:  # a full disk, a folder made read-only meanwhile: this photo's, not the batch's
                message = f"{path}: scanned, but its results could not be written ({err.strerror or err})"
            else:
                message = ""
        if not message:
            if "note" in record:
                print(f"note: {path}: {record['note']}", file=sys.stderr, flush=True)
            results.append(result)
            # Thumbnails only: a folder of hundreds of photos must not keep full overlays in memory.
            overlay.thumbnail((SHEET_THUMB, SHEET_THUMB))
            sheet.append((f"{stem}: {result.label}", overlay))  # the stem names its files: NAME_2 for a second NAME
            rows.append({"file": str(path), "verdict": result.label,
                         "flagged_fraction": f"{result.flagged_fraction:.6f}", "n_regions": len(result.regions),
                         "max_probability": f"{result.max_probability:.6f}", "seconds": f"{result.seconds:.3f}",
                         "overlay": f"{stem}.overlay.jpg", "error": ""})
            if not quiet:
                print(f"{result.label:<9} max {shown(result.max_probability)}  {100 * result.flagged_fraction:5.1f}% "
                      f"flagged  {len(result.regions)} region(s)  {result.seconds:.2f} s  {path}", flush=True)
            continue
        print(f"error: {message}", file=sys.stderr, flush=True)
        errors.append(message)
        rows.append({"file": str(path), "verdict": "error", "flagged_fraction": "", "n_regions": "",
                     "max_probability": "", "seconds": "", "overlay": "", "error": message})
    # surrogateescape: a file name that is not valid UTF-8 is written escaped rather than ending the batch.
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if len(sheet) > 1:
        contact_sheet(sheet).save(out_dir / "contact_sheet.jpg", quality=85)
    else:  # an earlier batch's sheet in the same folder would show photos this summary does not list
        (out_dir / "contact_sheet.jpg").unlink(missing_ok=True)
    return ScanSummary(results=results, errors=errors, out_dir=out_dir)
