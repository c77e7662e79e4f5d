"""Shared fixtures: tiny generated images and models, and paths to the real data when it is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crackscan.demo import concrete_patch, concrete_photo  # noqa: F401  (re-exported for tests)
from crackscan.model import build_model, make_meta, save_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MENDELEY_DEV = SHARED / "data" / "mendeley-dev"
PHOTOS = SHARED / "data" / "photos"
IMAGENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet1k.safetensors"

TINY_SIZE = 64


def make_dataset(root: Path, per_class: int = 40, size: int = 72, seed: int = 0, groups_of: int = 5) -> Path:
    """Mendeley-style folders Positive/ and Negative/ with numbered files (runs of ``groups_of`` = one photo)."""
    rng = np.random.default_rng(seed)
    for label, crack in (("Positive", True), ("Negative", False)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            concrete_patch(rng, size, crack).save(folder / f"{i + 1:05d}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """80 generated patches, 40 per class, numbered like the Mendeley files."""
    return make_dataset(tmp_path_factory.mktemp("data"))


def calibrate_batchnorm(module: torch.nn.Module, meta: dict, seed: int = 0) -> None:
    """Set every BatchNorm's statistics from a few generated images.

    A freshly initialised MobileNetV2 in eval mode (running mean 0, variance 1) shrinks its activations
    layer after layer: its 1280 features come out near 1e-10, the same everywhere, and a map computed from
    them would pass any comparison. With real statistics they vary from place to place as a trained
    network's do.
    """
    from crackscan.transforms import normalize_batch

    rng = np.random.default_rng(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over the batches below
    module.train()
    with torch.no_grad():
        for _ in range(3):
            pixels = np.stack([np.asarray(concrete_patch(rng, 160, bool(i % 2))) for i in range(8)])
            module.features(normalize_batch(pixels, meta["mean"], meta["std"]))
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = 0.1
    module.eval()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """An untrained crackscan model file at input size 64 (random weights, BatchNorm statistics from
    generated images, see :func:`calibrate_batchnorm`): for plumbing tests, not accuracy."""
    torch.manual_seed(0)
    module = build_model()
    meta = make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=TINY_SIZE)
    calibrate_batchnorm(module, meta)
    return save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", module, meta)


def require(path: Path) -> Path:
    """Skip the calling test, with the reason, when a shared resource is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data lives beside the repository only on dev/CI machines)")
    return path
