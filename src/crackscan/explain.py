"""Grad-CAM: which part of a patch made the model call it a crack.

Grad-CAM weighs each channel of the last convolutional block's output by the mean gradient of the
crack score with respect to it, and keeps the positive part of the weighted sum: a coarse map
(input_size / 32 cells a side) of the evidence *for* a crack. The score is the crack class's log-odds
(its logit minus the log-sum-exp of the others), so for two classes the map explains the probability
itself rather than one logit that softmax could cancel.

The shared network is never changed: the base runs without gradients, and only a detached copy of its
output takes part in the backward pass through the head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from crackscan.images import ImageSource, describe, load_patch, oriented_size, read_source
from crackscan.model import CrackModel, check_image, check_threshold

if TYPE_CHECKING:
    from crackscan.scan import ScanResult

#: Flagged patches explained per photo by :func:`gradcam_map_for_photo`.
TOP_K = 12


def gradcam(model: CrackModel, pixels: np.ndarray) -> tuple[float, np.ndarray]:
    """Crack probability and Grad-CAM heat map of one patch.

    Args:
        model: A loaded classifier.
        pixels: HxWx3 uint8 patch, normally at ``model.input_size`` (see :func:`crackscan.images.load_patch`).

    Returns:
        ``(probability, heat)``: the crack probability, and an HxW float32 map in [0, 1] (1 = the
        strongest evidence for a crack in this patch; all zeros when there is none).
    """
    module = model.network("Grad-CAM")
    height, width = check_image(pixels).shape[:2]
    batch = model.preprocess(np.array(pixels, dtype=np.uint8)[None])  # a writable copy: torch warns on read-only arrays
    # inference_mode(False): callers may sit inside torch.inference_mode(), where nothing can need a gradient.
    with torch.inference_mode(False):
        with torch.no_grad():
            activations = module.features(batch.clone())
        activations = activations.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = module.classifier(activations.mean(dim=(2, 3)))[0]
            crack = model.crack_index
            others = torch.cat([logits[:crack], logits[crack + 1:]])
            score = logits[crack] - torch.logsumexp(others, dim=0)
            (gradient,) = torch.autograd.grad(score, activations)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
        heat = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        probability = float(torch.softmax(logits.detach(), dim=0)[crack])
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else torch.zeros_like(heat)
    return probability, heat.clamp(0, 1).numpy().astype(np.float32)


def _blend(pixels: np.ndarray, heat: np.ndarray, strength: float = 0.6) -> np.ndarray:
    from crackscan.scan import heat_colours

    alpha = (strength * heat)[..., None]
    return (pixels * (1 - alpha) + heat_colours(heat) * alpha + 0.5).astype(np.uint8)


def explain_image(
    model: CrackModel, source: ImageSource, out_path: str | os.PathLike, *, threshold: float | None = None
) -> dict[str, Any]:
    """Write a Grad-CAM overlay PNG for one patch image: the patch, the patch with its heat map, a caption.

    Args:
        model: A loaded classifier.
        source: The image (path, bytes or stream); it is brought to the model's input size as in training.
        out_path: The PNG to write (its folder is created).
        threshold: Decision threshold for the label (default: the model's).

    Returns:
        ``{"file", "crack_probability", "label", "overlay", "image_size"}`` (``image_size``: the image's own
        ``[width, height]``, EXIF orientation applied).

    Raises:
        ImageError: The image cannot be read.
    """
    from crackscan.scan import font

    check_threshold(threshold)
    name = describe(source)
    data = read_source(source, name)  # once: a stream cannot be read twice
    pixels = load_patch(data, model.input_size, name=name)
    width, height = oriented_size(data) or (model.input_size, model.input_size)
    probability, heat = gradcam(model, pixels)
    label = model.label_for(probability, threshold)
    cutoff = model.threshold if threshold is None else threshold

    side = max(256, model.input_size * 2)  # small patches are hard to read at their own size
    original = Image.fromarray(pixels, "RGB").resize((side, side), Image.Resampling.BILINEAR)
    big_heat = np.asarray(
        Image.fromarray(heat, mode="F").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32
    ).clip(0, 1)
    overlaid = Image.fromarray(_blend(np.asarray(original, dtype=np.float32), big_heat), "RGB")
    text = max(12, side // 22)
    canvas = Image.new("RGB", (2 * side + 12, side + 4 * text + 8), (24, 24, 24))
    canvas.paste(original, (4, 4))
    canvas.paste(overlaid, (side + 8, 4))
    draw = ImageDraw.Draw(canvas)
    colour = (255, 90, 90) if label == model.crack_class else (120, 220, 120)
    draw.text((6, side + 8), f"{label}: crack probability {probability:.3f} (threshold {cutoff:.2f})",
              fill=colour, font=font(int(text * 1.1)))
    draw.text((6, side + 10 + int(text * 1.5)),
              f"{Path(name).name} | right: Grad-CAM, evidence for a crack (bright = strong)",
              fill=(220, 220, 220), font=font(text))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return {
        "file": name,
        "crack_probability": round(probability, 6),
        "label": label,
        "overlay": str(out_path),
        "image_size": [int(width), int(height)],
    }


def gradcam_map_for_photo(
    model: CrackModel, photo: Image.Image, result: "ScanResult", *, top_k: int = TOP_K
) -> np.ndarray:
    """Grad-CAM over a scanned photo: the strongest flagged patches explained and pasted in place.

    Each chosen patch's heat is multiplied by its cell's probability in the map and the maps are combined
    by maximum. Patches are taken from every flagged region in turn (each region's strongest cell first,
    regions strongest first), skipping any whose centre lies within half a patch of one already taken, so
    ``top_k`` explanations spread over the regions; when nothing is flagged the three strongest cells are
    explained (as faintly as their probability is low). Patches reaching past the photo's edge are padded
    with its edge pixels, as the scan pads them. Each Grad-CAM costs
    one patch's forward and backward pass, so the map stays cheap for any photo size.

    Args:
        model: The model that made ``result``.
        photo: The photo at any resolution, oriented as ``result.photo_size`` (e.g. the scaled photo).
        result: Its scan.
        top_k: At most this many patches are explained.

    Returns:
        A float32 map in [0, 1] with ``photo``'s height and width, for :func:`crackscan.scan.render_overlay`.
    """
    from crackscan.scan import crop_edge_padded, label_regions

    probability = result.probability
    flagged = probability >= result.threshold
    if flagged.any():
        # Strongest cell of each region first (regions by their strongest cell), then each region's second, ...:
        # a large region must not take every explanation while a weaker one gets none.
        labels = label_regions(flagged)
        cells = np.flatnonzero(flagged)
        cells = cells[np.argsort(-probability.flat[cells], kind="stable")]
        rank = np.zeros(len(cells), dtype=int)
        seen: dict[int, int] = {}
        for i, label in enumerate(labels.flat[cells]):
            rank[i] = seen.get(int(label), 0)
            seen[int(label)] = rank[i] + 1
        candidates = cells[np.argsort(rank, kind="stable")]
    else:
        candidates = np.argsort(probability, axis=None)[::-1][:3]
    ratio_x, ratio_y = photo.width / result.photo_size[0], photo.height / result.photo_size[1]
    heat = np.zeros((photo.height, photo.width), dtype=np.float32)
    taken: list[tuple[float, float]] = []
    rgb = np.asarray(photo.convert("RGB"))
    for flat in candidates:
        if len(taken) >= top_k:
            break
        row, col = np.unravel_index(int(flat), probability.shape)
        x0, y0, x1, y1 = result.patch_box(int(row), int(col))
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        if any(max(abs(centre[0] - cx), abs(centre[1] - cy)) < result.patch_size / 2 for cx, cy in taken):
            continue
        taken.append(centre)
        box = (round(x0 * ratio_x), round(y0 * ratio_y), round(x1 * ratio_x), round(y1 * ratio_y))
        patch = Image.fromarray(crop_edge_padded(rgb, box)).resize((model.input_size, model.input_size),
                                                                    Image.Resampling.BILINEAR)
        _, cam = gradcam(model, np.asarray(patch, dtype=np.uint8))
        w, h = box[2] - box[0], box[3] - box[1]
        # Weighed by the map's probability for the cell, which the overlay's legend and the verdict read.
        weight = float(probability[row, col])
        cam = np.asarray(Image.fromarray(cam * weight, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        # Paste the part that lies inside the photo.
        px0, py0 = max(0, box[0]), max(0, box[1])
        px1, py1 = min(photo.width, box[2]), min(photo.height, box[3])
        if px1 <= px0 or py1 <= py0:
            continue
        part = cam[py0 - box[1]:py1 - box[1], px0 - box[0]:px1 - box[0]]
        np.maximum(heat[py0:py1, px0:px1], part, out=heat[py0:py1, px0:px1])
    return heat.clip(0, 1)
