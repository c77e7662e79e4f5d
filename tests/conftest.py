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


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """An untrained (random) crackscan model file at input size 64: for plumbing tests, not accuracy."""
    torch.manual_seed(0)
    module = build_model()
    meta = make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=TINY_SIZE)
    return save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", module.eval(), meta)


def require(path: Path) -> Path:
    """Skip the calling test, with the reason, when a shared resource is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data lives beside the repository only on dev/CI machines)")
    return path
