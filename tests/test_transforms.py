"""Preprocessing presets: normalisation, reproducible augmentation, drawn hard negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crackscan.transforms import IMAGENET_MEAN, IMAGENET_STD, Augment, TrainPreset, man_made_negative, normalize_batch


def test_normalize_batch_matches_the_formula_and_is_channels_last():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    out = normalize_batch(pixels, IMAGENET_MEAN, IMAGENET_STD)
    expected = (pixels.transpose(0, 3, 1, 2) / 255.0 - np.array(IMAGENET_MEAN)[None, :, None, None]) / np.array(
        IMAGENET_STD)[None, :, None, None]
    assert out.shape == (3, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    assert np.allclose(out.numpy(), expected, atol=1e-5)


def test_train_preset_is_reproducible_and_augments():
    rng = np.random.default_rng(1)
    patch = torch.from_numpy(rng.integers(0, 256, (3, 40, 40), dtype=np.uint8))
    preset = TrainPreset(32, Augment())
    a = preset(patch, torch.Generator().manual_seed(5))
    b = preset(patch, torch.Generator().manual_seed(5))
    c = preset(patch, torch.Generator().manual_seed(6))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = TrainPreset(40, Augment.none())(patch, torch.Generator().manual_seed(5))
    assert torch.equal(plain, patch)


def test_man_made_negative_draws_a_line_reproducibly():
    rng = np.random.default_rng(2)
    patch = np.clip(rng.normal(170, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
    a = man_made_negative(patch, np.random.default_rng(3))
    b = man_made_negative(patch, np.random.default_rng(3))
    assert a.shape == patch.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    # Something was drawn: a good part of the patch moved well away from the plain surface.
    assert (np.abs(a.astype(int) - patch.astype(int)).max(axis=2) > 40).mean() > 0.02


def _dark_side(patch: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    return drawn.astype(int).mean(axis=2) < patch.astype(int).mean(axis=2) * 0.6


def _edge_residual(dark: np.ndarray) -> float:
    """Spread (px) of the dark region's boundary pixels about their best straight line."""
    from scipy import ndimage

    boundary = dark & ~ndimage.binary_erosion(dark, border_value=1)
    points = np.argwhere(boundary).astype(float)
    points -= points.mean(axis=0)
    return float(np.linalg.svd(points, compute_uv=False)[1] / np.sqrt(len(points)))


def test_ragged_edge_leaves_the_surface_on_one_side_and_wanders():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    patch = np.clip(rng.normal(170, 10, (96, 96, 3)), 0, 255).astype(np.uint8)
    ragged, straight = [], []
    for seed in range(6):
        drawn = man_made_negative(patch, np.random.default_rng(seed), kind="ragged")
        dark = _dark_side(patch, drawn)
        # One dark region and one stretch of surface: a gap beyond an edge, not a line across a surface ...
        assert ndimage.label(dark)[1] == 1 and ndimage.label(~dark)[1] == 1
        assert 0.05 < dark.mean() < 0.95
        # ... textured like a shadowed surface (the patch turned about and darkened), not a flat fill.
        inside = ndimage.binary_erosion(dark, iterations=3)
        turned = patch[::-1, ::-1].astype(float).mean(axis=2)[inside]
        assert np.corrcoef(drawn.astype(float).mean(axis=2)[inside], turned)[0, 1] > 0.5
        ragged.append(_edge_residual(dark))
        edge = _dark_side(patch, man_made_negative(patch, np.random.default_rng(seed), kind="edge"))
        if edge.any():  # a straight edge to a darker surface (some are to a lighter one)
            straight.append(_edge_residual(edge))
    # Its boundary strays from a straight line far more than a straight edge's does.
    assert straight and min(ragged) > 2 * max(straight), (ragged, straight)


def test_man_made_negative_refuses_an_unknown_kind():
    patch = np.full((32, 32, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="kind must be one of"):
        man_made_negative(patch, np.random.default_rng(0), kind="crack")


def test_normalize_batch_takes_read_only_pixels_without_a_warning():
    # A loaded dataset's pixels are read-only; PyTorch warns (once per process) when it wraps such memory.
    import warnings

    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    frozen = pixels.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize_batch(frozen, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(out, normalize_batch(pixels, IMAGENET_MEAN, IMAGENET_STD))
