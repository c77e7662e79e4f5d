"""The scan's dense head: its map, its fitting on mosaics, and its place in model files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import concrete_patch
from crackscan.dense_head import DenseHeadFit, attach, averaged_head, build_mosaics, fit_dense_head
from crackscan.model import CrackModel, ModelError, dense_kernel, load_model, save_model
from crackscan.scan import VERIFY_CROPS, default_verify, scan_scaled
from test_scan import HEAD_SIZE, grid_photo, head_trained_model_path


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def head_model():
    return load_model(head_trained_model_path())


def _with_head(model: CrackModel, weight: torch.Tensor, bias: torch.Tensor) -> CrackModel:
    """A copy of ``model`` with this dense head (its own network: no cached session is shared)."""
    module = copy.deepcopy(model.module)
    attach(module, DenseHeadFit(weight=weight, bias=bias, agreement=None, start_agreement=None, mosaics=0, seconds=0))
    return CrackModel(module=module, meta=dict(model.meta))


def _random_head(model: CrackModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    k = dense_kernel(model.input_size)
    return torch.randn(1, 1280, k, k, generator=generator) * 0.05, torch.tensor([0.3])


def test_mosaics_lay_whole_patches_edge_to_edge():
    patches = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 96, 96, 3), np.uint8)
    mosaics = build_mosaics(patches, 3, np.random.default_rng(0))
    assert mosaics.shape == (3, 768, 768, 3)
    for mosaic in mosaics:
        tiles = mosaic.reshape(8, 96, 8, 96, 3)
        # Every tile is one whole patch: constant inside, a value some patch has.
        assert (tiles == tiles[:, :1, :, :1]).all()
        assert set(np.unique(tiles)) <= set(range(10))
    assert len(np.unique(mosaics)) > 3  # patches drawn at random, not one repeated


@pytest.mark.parametrize("backend, whole_pass_pixels", [("torch", 0), ("onnx", 10**7)])
@pytest.mark.parametrize("cells", [1, 2])
def test_dense_head_map_is_the_head_convolved_over_the_features(tiny_model, backend, whole_pass_pixels, cells):
    # The scan reads each kernel position off its own cell; the reference convolves the whole feature map.
    # A random head has different weights at each position, so a position read off the wrong cell fails.
    model = _with_head(tiny_model, *_random_head(tiny_model))
    size = model.input_size
    rows, cols = 4, 6
    step = cells * 32
    pixels = np.asarray(concrete_patch(np.random.default_rng(3), 256, True).resize(
        (size + (cols - 1) * step, size + (rows - 1) * step)))
    result = scan_scaled(model, pixels, pixels.shape[1::-1], patch_size=size, stride=step, verify=0,
                         backend=backend, whole_pass_pixels=whole_pass_pixels, max_values=200_000)
    with torch.inference_mode():
        features = model.module.features(model.preprocess(pixels[None]))
        want = torch.sigmoid(model.module.dense_head(features)[0, 0, ::cells, ::cells]).numpy()
    assert result.map_shape == want.shape == (rows, cols)
    np.testing.assert_allclose(result.probability, want, atol=3e-4)  # fused BatchNorm, tiles: float rounding


def test_the_averaged_head_as_a_dense_head_gives_the_averaged_map(tiny_model):
    # The fit starts from the classifier's head spread over the k x k cells: the map it replaces.
    pixels = np.asarray(concrete_patch(np.random.default_rng(5), 256, True).resize((224, 160)))
    plain = scan_scaled(tiny_model, pixels, (224, 160), patch_size=tiny_model.input_size, verify=0)
    spread = scan_scaled(_with_head(tiny_model, *averaged_head(tiny_model)), pixels, (224, 160),
                         patch_size=tiny_model.input_size, verify=0)
    np.testing.assert_allclose(spread.probability, plain.probability, atol=1e-5)


def test_fitted_head_follows_the_crops_better_than_the_averaged_head(head_model, tmp_path):
    # Generated patches (crack = dark jagged line); the classifier's crops are the teacher.
    rng = np.random.default_rng(11)
    train = np.stack([np.asarray(concrete_patch(rng, HEAD_SIZE, bool(i % 3 == 0))) for i in range(216)])
    val = np.stack([np.asarray(concrete_patch(rng, HEAD_SIZE, bool(i % 3 == 0))) for i in range(72)])
    said = []
    fit = fit_dense_head(head_model, np.concatenate([train, val]), np.arange(216), np.arange(216, 288),
                         mosaics=6, val_mosaics=2, say=said.append)
    assert fit.mosaics == 6 and fit.weight.shape == (1, 1280, 4, 4)
    assert fit.agreement > fit.start_agreement and "validation mosaics" in said[0]
    # On a photo it never saw: the fitted map is closer to the crop-by-crop map than the averaged one.
    path = grid_photo(tmp_path / "grid.jpg", [[False, True, False, False], [False, False, False, True],
                                              [True, False, False, False]], seed=9)
    image = Image.open(path)
    scaled = image.resize((image.width * HEAD_SIZE // 227, image.height * HEAD_SIZE // 227))
    maps = {name: scan_scaled(model, scaled, image.size, **options).probability >= 0.5
            for name, model, options in (("crops", head_model, {"method": "crops"}),
                                         ("averaged", head_model, {"verify": 0}),
                                         ("fitted", _with_head(head_model, fit.weight, fit.bias), {"verify": 0}))}
    agree = {name: float((maps[name] == maps["crops"]).mean()) for name in ("averaged", "fitted")}
    assert agree["fitted"] > agree["averaged"], agree


def test_model_file_keeps_its_dense_head(tiny_model, tmp_path):
    model = _with_head(tiny_model, *_random_head(tiny_model, seed=2))
    path = model.save(tmp_path / "with-head.safetensors")
    loaded = load_model(path)
    torch.testing.assert_close(loaded.module.dense_head.weight, model.module.dense_head.weight, rtol=0, atol=0)
    assert default_verify(loaded) == 0 and default_verify(tiny_model) == VERIFY_CROPS
    # Its scans skip verification unless asked for.
    pixels = np.asarray(concrete_patch(np.random.default_rng(1), 256, True))
    assert scan_scaled(loaded, pixels, (256, 256), patch_size=64, threshold=0.0).verified == 0
    # The JSON says which head made the map.
    assert scan_scaled(loaded, pixels, (256, 256), patch_size=64).to_dict()["head"] == "dense"
    assert scan_scaled(tiny_model, pixels, (256, 256), patch_size=64).to_dict()["head"] == "averaged"
    assert scan_scaled(loaded, pixels, (256, 256), patch_size=64, method="crops").to_dict()["head"] == "classifier"


def test_a_dense_head_that_does_not_fit_the_input_size_is_refused(tiny_model, tmp_path):
    module = copy.deepcopy(tiny_model.module)
    module.dense_head = torch.nn.Conv2d(1280, 1, 3)  # 64-px patches span 2 cells, not 3
    path = save_model(tmp_path / "bad.safetensors", module, dict(tiny_model.meta))
    with pytest.raises(ModelError, match="dense_head.weight has shape"):
        load_model(path)


@pytest.mark.parametrize("input_size", [80, 90, 120])
def test_fit_and_scan_at_input_sizes_that_are_not_multiples_of_32(tiny_model, input_size, tmp_path):
    # The features must cover exactly the cells the crops are cut for, as in a scan's grid.
    module = copy.deepcopy(tiny_model.module)
    model = CrackModel(module=module, meta={**tiny_model.meta, "input_size": input_size})
    rng = np.random.default_rng(input_size)
    patches = np.stack([np.asarray(concrete_patch(rng, input_size, bool(i % 2))) for i in range(20)])
    fit = fit_dense_head(model, patches, np.arange(20), np.arange(20), mosaics=2, val_mosaics=1, epochs=2)
    k = -(-input_size // 32)
    assert fit.weight.shape == (1, 1280, k, k) and fit.agreement is not None
    attach(module, fit)
    path = model.save(tmp_path / f"m{input_size}.safetensors")
    photo = np.asarray(concrete_patch(rng, 400, True).resize((333, 257)))
    result = scan_scaled(load_model(path), photo, (333, 257), patch_size=input_size)
    assert result.head == "dense" and result.map_shape == ((257 - input_size) // 32 + 1, (333 - input_size) // 32 + 1)


def test_only_the_given_rows_are_drawn():
    patches = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 96, 96, 3), np.uint8)
    mosaics = build_mosaics(patches, 4, np.random.default_rng(0), rows=np.array([2, 7]))
    assert set(np.unique(mosaics)) == {2, 7}
