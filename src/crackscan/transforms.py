"""Preprocessing: batch normalisation, the train transform with augmentation, drawn hard negatives.

The eval transform is :func:`crackscan.images.load_patch` (decode, then resize), used by every consumer.

Pixels travel as uint8 HxWx3 arrays (cheap to cache and to send between processes) and become
normalised float tensors only in whole batches, in :func:`normalize_batch`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_batch(pixels: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """NxHxWx3 uint8 -> Nx3xHxW float32 normalised, in channels_last memory (the fast layout on CPU)."""
    if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
        pixels = pixels.copy()  # read-only memory (a loaded dataset's pixels): torch warns about wrapping it
    batch = torch.as_tensor(pixels)
    if batch.ndim == 3:
        batch = batch.unsqueeze(0)
    # permute() of an NHWC buffer *is* channels_last NCHW: no copy until the arithmetic below.
    batch = batch.permute(0, 3, 1, 2).float()
    scale = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((batch - shift) / scale).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Augment:
    """Training augmentation, on by default. Each field can be switched off or tuned from the CLI."""

    flips: bool = True
    rot90: bool = True
    crop_scale: float = 0.7  # smallest area fraction kept by the random resized crop; 1.0 = no crop
    jitter: float = 0.15  # brightness / contrast / saturation jitter strength; 0 = none

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def none(cls) -> "Augment":
        return cls(flips=False, rot90=False, crop_scale=1.0, jitter=0.0)


class TrainPreset:
    """Random view of a 3xHxW uint8 patch, at the same size, as the model sees it in training.

    Crack patches have no "up": flips and quarter turns are label-preserving and free. The crop keeps
    most of the patch so a thin crack near the border is rarely cut out of a positive. Parameters are
    drawn from the caller's generator, so every view is reproducible (a resumed run sees the same data).
    """

    def __init__(self, size: int, augment: Augment):
        self.size = size
        self.augment = augment

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """3xHxW uint8 tensor -> augmented 3xSxS uint8 tensor."""
        a = self.augment
        u = torch.rand(8, generator=generator).tolist()
        out = pixels
        _, h, w = out.shape
        if a.crop_scale < 1.0:
            area = h * w * (a.crop_scale + (1.0 - a.crop_scale) * u[0])
            ratio = math.exp(math.log(0.8) + (math.log(1.25) - math.log(0.8)) * u[1])
            ch = min(h, max(1, round(math.sqrt(area / ratio))))
            cw = min(w, max(1, round(math.sqrt(area * ratio))))
            top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
            out = F.resized_crop(out, top, left, ch, cw, [self.size, self.size], antialias=True)
        elif (h, w) != (self.size, self.size):
            out = F.resize(out, [self.size, self.size], antialias=True)
        if a.flips and u[4] < 0.5:
            out = F.horizontal_flip(out)
        if a.rot90:
            out = torch.rot90(out, int(u[5] * 4) % 4, dims=(1, 2))
        if a.jitter > 0:
            # One random direction per view: brightness, contrast and saturation each in [1-j, 1+j].
            j = a.jitter
            factors = (1 - j + 2 * j * torch.rand(3, generator=generator)).tolist()
            out = F.adjust_brightness(out, factors[0])
            out = F.adjust_contrast(out, factors[1])
            out = F.adjust_saturation(out, factors[2])
        return out


#: What :func:`man_made_negative` draws, and how often.
MAN_MADE_KINDS = {"cables": 0.4, "edge": 0.2, "ragged": 0.25, "joint": 0.15}


def man_made_negative(pixels: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A crack-free patch with a man-made line drawn on it: cables, a straight or ragged edge, or a joint.

    Inspection photos are full of smooth, even-width lines and straight edges that a crack classifier
    trained on bare concrete has never seen labelled "no crack" (the Mendeley negatives are plain
    surfaces). Drawn onto training negatives, they teach that a dark line alone is not a crack: a crack
    is irregular in path and width. A ragged edge (a chipped surface ending at a dark gap) is irregular
    too, but has the surface on one side only, where a crack has it on both. Validation and test data are
    never touched.

    Args:
        pixels: HxWx3 uint8 negative patch.
        rng: Source of randomness (the caller seeds it for reproducibility).
        kind: One of :data:`MAN_MADE_KINDS`; drawn at random with their weights when None (a given kind
            skips that draw, so the same seed then draws a different line than a random pick of that kind).
    """
    from PIL import Image, ImageDraw, ImageFilter

    size = pixels.shape[0]
    up = 4  # draw large, then shrink: antialiased edges like a photo's
    s = size * up
    # The drawing goes into two greyscale layers at 4x, its shade and its coverage, which are shrunk
    # (box filter) and laid over the photo: the photo itself is never enlarged.
    shade = Image.new("L", (s, s), 0)
    cover = Image.new("L", (s, s), 0)
    ink, mask = ImageDraw.Draw(shade), ImageDraw.Draw(cover)

    def band(curve: np.ndarray, tone: int, width: float) -> None:
        """A smooth curve of even width, as one polygon (its two sides offset along the normals)."""
        tangent = np.gradient(curve, axis=0)
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
        normal *= width / 2 / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-6)
        outline = [tuple(map(float, q)) for q in np.concatenate([curve + normal, (curve - normal)[::-1]])]
        ink.polygon(outline, fill=tone)
        mask.polygon(outline, fill=255)

    if kind is None:
        kind = str(rng.choice(list(MAN_MADE_KINDS), p=list(MAN_MADE_KINDS.values())))
    elif kind not in MAN_MADE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MAN_MADE_KINDS)}, got {kind!r}")
    gap = None
    if kind == "cables":
        width = int(rng.uniform(0.05, 0.14) * s)
        base = int(rng.integers(20, 235))
        start, end = rng.uniform(0, s, 2), rng.uniform(0, s, 2)
        # enter on one side, leave on another, with a gentle bend
        p0 = np.array([0.0, start[0]]) if rng.random() < 0.5 else np.array([start[0], 0.0])
        p2 = np.array([s, end[0]]) if p0[0] == 0 else np.array([end[0], s])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * s, 2)
        direction = (p2 - p0) / (np.linalg.norm(p2 - p0) + 1e-6)
        normal = np.array([-direction[1], direction[0]])
        t = np.linspace(0, 1, 40)[:, None]
        for k in range(int(rng.integers(1, 4))):
            offset = normal * k * width * rng.uniform(1.05, 1.4)
            curve = (1 - t) ** 2 * (p0 + offset) + 2 * (1 - t) * t * (p1 + offset) + t**2 * (p2 + offset)
            tone = int(np.clip(base + rng.normal(0, 12), 0, 255))
            band(curve, tone, width)
            highlight = int(np.clip(tone + rng.uniform(25, 70), 0, 255))  # a round cable's specular band
            band(curve, highlight, max(1, width // 4))
    elif kind == "ragged":  # a broken edge: the boundary wanders and has lumps on it
        angle = rng.uniform(0, 2 * np.pi)
        along = np.array([np.cos(angle), np.sin(angle)])
        across = np.array([-along[1], along[0]])
        t = np.linspace(-0.8, 0.8, 64) * s
        wander = np.cumsum(rng.normal(0, rng.uniform(0.006, 0.02) * s, t.size))
        wander -= np.linspace(wander[0], wander[-1], t.size)  # no overall tilt: the edge keeps its angle
        # Lumps: smooth bulges of the surface into the gap (the gap lies on the -across side of the edge).
        # Bites the other way were tried and trained worse (README, Results: the wall photo).
        for _ in range(int(rng.integers(0, 4))):
            where, reach = rng.uniform(-0.6, 0.6) * s, rng.uniform(0.04, 0.15) * s
            wander -= rng.uniform(0.03, 0.12) * s * np.exp(-(((t - where) / reach) ** 2))
        centre = np.full(2, s / 2) + across * rng.uniform(-0.3, 0.3) * s
        edge = centre + t[:, None] * along + wander[:, None] * across
        far = [tuple(edge[-1] - across * 2 * s), tuple(edge[0] - across * 2 * s)]
        mask.polygon([tuple(map(float, q)) for q in edge] + far, fill=255)
        # Seen through the gap (in place of a drawn tone): the surface turned about and darkened, textured
        # as a shadowed gap is.
        gap = pixels[::-1, ::-1].astype(np.float32) * rng.uniform(0.1, 0.35)
    else:
        angle = rng.uniform(0, np.pi)
        centre = rng.uniform(0.25, 0.75, 2) * s
        d = np.array([np.cos(angle), np.sin(angle)]) * s * 2
        a, b = centre - d, centre + d
        n = np.array([-np.sin(angle), np.cos(angle)]) * s * 2
        if kind == "edge":  # a straight boundary to a darker (or lighter) surface
            tone = int(rng.choice([rng.integers(5, 60), rng.integers(200, 250)]))
            corners = [tuple(a), tuple(b), tuple(b + n), tuple(a + n)]
            ink.polygon(corners, fill=tone)
            mask.polygon(corners, fill=255)
        else:  # a straight, even joint or groove
            band(np.stack([a, b]), int(rng.integers(20, 90)), rng.uniform(0.02, 0.06) * s)
    coverage = np.asarray(cover.reduce(up), dtype=np.float32)[..., None] / 255.0
    if gap is None:
        # Shrunk shade is premultiplied by coverage; dividing it back out gives the drawn tone at the edges.
        drawn = np.asarray(shade.reduce(up), dtype=np.float32)[..., None] / np.maximum(coverage, 1 / 255.0)
    else:
        drawn = gap
    blended = pixels.astype(np.float32) * (1 - coverage) + np.clip(drawn, 0, 255) * coverage
    out = Image.fromarray((blended + 0.5).astype(np.uint8), "RGB").filter(ImageFilter.GaussianBlur(radius=0.6))
    return np.asarray(out, dtype=np.uint8)
