"""Preprocessing presets: one eval transform for every consumer, one train transform with augmentation.

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

from crackscan.images import ImageSource, load_patch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EvalPreset:
    """Image source -> HxWx3 uint8 at the model's input size (JPEG DCT-scaled decode, then bilinear resize)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, source: ImageSource) -> np.ndarray:
        return load_patch(source, self.size)


def normalize_batch(pixels: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """NxHxWx3 uint8 -> Nx3xHxW float32 normalised, in channels_last memory (the fast layout on CPU)."""
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
