"""Preprocessing presets: normalisation, reproducible augmentation, drawn hard negatives."""

from __future__ import annotations

import numpy as np
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
