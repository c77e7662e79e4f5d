"""Preprocessing presets: one eval transform for every consumer, one train transform with augmentation.

Pixels travel as uint8 HxWx3 arrays (cheap to cache and to send between processes) and become
normalised float tensors only in whole batches, in :func:`normalize_batch`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

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
    """Random view of an HxWx3 uint8 patch, at the same size, as the model sees it in training.

    Crack patches have no "up": flips and quarter turns are label-preserving and free. The crop keeps
    most of the patch so a thin crack near the border is rarely cut out of a positive.
    """

    def __init__(self, size: int, augment: Augment):
        self.size = size
        self.augment = augment
        steps: list = []
        if augment.crop_scale < 1.0:
            steps.append(v2.RandomResizedCrop(size, scale=(augment.crop_scale, 1.0), ratio=(0.8, 1.25), antialias=True))
        if augment.flips:
            steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if augment.jitter > 0:
            j = augment.jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        self._pipeline = v2.Compose(steps) if steps else None

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """3xHxW uint8 tensor -> augmented 3xHxW uint8 tensor; randomness drawn from ``generator``."""
        out = pixels
        if self._pipeline is not None:
            # torchvision draws from the global RNG; seed it from our generator so a view is reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                out = self._pipeline(out)
        if self.augment.rot90:
            k = int(torch.randint(0, 4, (1,), generator=generator))
            out = torch.rot90(out, k, dims=(1, 2))
        return out
