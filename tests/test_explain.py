"""Grad-CAM for patches and scanned photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import concrete_patch
from crackscan.explain import explain_image, gradcam, gradcam_map_for_photo
from crackscan.model import load_model
from crackscan.scan import decode_scaled, scan_paths, scan_scaled
from test_scan import HEAD_SIZE, head_trained_model_path


@pytest.fixture(scope="module")
def head_model():
    return load_model(head_trained_model_path())


def crack_on_left(size: int, seed: int = 0) -> np.ndarray:
    """Plain concrete with a dark jagged crack in the left quarter only."""
    rng = np.random.default_rng(seed)
    image = concrete_patch(rng, size, False)
    x = size // 8
    points = [(x + int(rng.integers(-size // 24, size // 24 + 1)), y) for y in range(0, size + 1, size // 8)]
    ImageDraw.Draw(image).line(points, fill=(30, 30, 30), width=max(2, size // 40))
    return np.asarray(image)


def test_gradcam_shape_range_probability_and_no_side_effects(tiny_model_path):
    model = load_model(tiny_model_path)
    before = {name: p.requires_grad for name, p in model.module.named_parameters()}
    pixels = np.asarray(concrete_patch(np.random.default_rng(0), 64, True))
    with torch.inference_mode():  # as the web service would call it
        probability, heat = gradcam(model, pixels)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    assert probability == pytest.approx(float(model.crack_probability(pixels[None], backend="torch")[0]), abs=1e-5)
    assert {name: p.requires_grad for name, p in model.module.named_parameters()} == before
    assert all(p.grad is None for p in model.module.parameters())


def test_heat_lies_on_the_crack(head_model):
    pixels = crack_on_left(HEAD_SIZE)
    probability, heat = gradcam(head_model, pixels)
    assert probability > 0.5
    quarter = HEAD_SIZE // 4
    assert heat[:, :quarter].mean() > 2 * heat[:, 2 * quarter:].mean()
    # The same patch mirrored moves the heat with the crack.
    _, mirrored = gradcam(head_model, np.ascontiguousarray(pixels[:, ::-1]))
    assert mirrored[:, -quarter:].mean() > 2 * mirrored[:, :2 * quarter].mean()


def test_explain_image_writes_overlay(head_model, tmp_path):
    source = tmp_path / "patch.jpg"
    Image.fromarray(crack_on_left(227, seed=1)).save(source, quality=95)
    out = tmp_path / "explained" / "patch.gradcam.png"
    record = explain_image(head_model, source, out)
    assert record["file"] == str(source) and record["overlay"] == str(out)
    assert record["label"] == head_model.label_for(record["crack_probability"])
    image = Image.open(out)
    assert image.format == "PNG" and image.width > 2 * HEAD_SIZE
    plain = tmp_path / "plain.jpg"
    concrete_patch(np.random.default_rng(2), 227, False).save(plain)
    lenient = explain_image(head_model, plain, tmp_path / "lenient.png", threshold=0.0)
    assert lenient["label"] == "Positive"


def test_gradcam_map_for_photo_follows_flagged_patches(head_model, tmp_path):
    rng = np.random.default_rng(7)
    photo = Image.new("RGB", (227 * 3, 227 * 2))
    for j in range(3):
        for i in range(2):
            photo.paste(Image.fromarray(crack_on_left(227, seed=i * 4 + j)) if j == 0
                        else concrete_patch(rng, 227, False), (j * 227, i * 227))
    path = tmp_path / "photo.png"
    photo.save(path)
    scaled, size = decode_scaled(path, HEAD_SIZE / 227)
    result = scan_scaled(head_model, scaled, size, threshold=0.5)
    # Enough patches to cover the photo: each one's heat is weighted by its own crop probability,
    # so the cracked column must outshine the plain ones.
    heat = gradcam_map_for_photo(head_model, scaled, result, top_k=8)
    assert heat.shape == (scaled.height, scaled.width) and heat.min() >= 0 and heat.max() <= 1
    if result.verdict:
        assert heat.max() > 0
    third = scaled.width // 3
    assert heat[:, :third].sum() > heat[:, 2 * third:].sum()
    summary = scan_paths(head_model, [path], tmp_path / "out", map_kind="gradcam", threshold=0.5, quiet=True)
    assert not summary.errors and (tmp_path / "out" / "photo.overlay.jpg").is_file()


def test_explain_keeps_both_files_of_the_same_name(tiny_model_path, tmp_path, capsys):
    # Mendeley's Positive/ and Negative/ use the same file names; the second overlay once replaced the first.
    from crackscan.cli import main

    rng = np.random.default_rng(2)
    for folder, crack in (("Negative", False), ("Positive", True)):
        (tmp_path / "data" / folder).mkdir(parents=True)
        concrete_patch(rng, 96, crack).save(tmp_path / "data" / folder / "01501.jpg")
    assert main(["explain", str(tiny_model_path), str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    said = [line.rsplit("->", 1)[1].strip() for line in capsys.readouterr().out.splitlines() if "->" in line]
    assert sorted(Path(p).name for p in said) == ["01501.gradcam.png", "01501_2.gradcam.png"]
    assert all(Path(p).is_file() for p in said)


def test_explain_reports_an_overlay_it_cannot_write_and_goes_on(tiny_model_path, tmp_path, capsys):
    from crackscan.cli import main

    rng = np.random.default_rng(3)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        concrete_patch(rng, 96, True).save(tmp_path / name)
    (tmp_path / "out" / "b.gradcam.png").mkdir(parents=True)
    paths = [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert main(["explain", str(tiny_model_path), *paths, "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {tmp_path / 'b.jpg'}: cannot explain (IsADirectoryError")
    assert len(captured.err.strip().splitlines()) == 1
    assert (tmp_path / "out" / "a.gradcam.png").is_file() and (tmp_path / "out" / "c.gradcam.png").is_file()


def test_explain_points_a_whole_photo_to_scan(tiny_model_path, tmp_path, capsys):
    from crackscan.cli import main

    rng = np.random.default_rng(5)
    photo, patch = tmp_path / "photo.jpg", tmp_path / "patch.jpg"
    concrete_patch(rng, 256, True).resize((1200, 900)).save(photo)
    concrete_patch(rng, 227, True).save(patch)
    assert main(["explain", str(tiny_model_path), str(photo), str(patch), "--out", str(tmp_path / "out")]) == 0
    size = load_model(tiny_model_path).input_size
    assert capsys.readouterr().err.splitlines() == [
        f"note: {photo} is 1200x900 px: explain squeezes it into one {size}-px patch; "
        "for a photo use `crackscan scan --map gradcam`"]


def test_explain_with_an_onnx_model_is_one_error_before_any_output(tiny_model_path, tmp_path, capsys):
    from crackscan.cli import main
    from crackscan.export import export_onnx

    onnx_file = export_onnx(load_model(tiny_model_path), tmp_path / "m.onnx").path
    images = []
    for i in range(3):
        images.append(tmp_path / f"p{i}.png")
        Image.fromarray(crack_on_left(64, seed=i)).save(images[-1])
    assert main(["explain", onnx_file, *map(str, images), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("Grad-CAM needs the PyTorch model") == 1
    assert not (tmp_path / "out").exists()


def test_crop_edge_padded_repeats_the_photos_edge_as_the_scan_pads():
    from crackscan.scan import crop_edge_padded

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(crop_edge_padded(rgb, (1, 1, 4, 3)), rgb[1:3, 1:4])
    expected = np.pad(rgb, ((2, 3), (1, 4), (0, 0)), mode="edge")  # box (-1, -2, 11, 8)
    assert np.array_equal(crop_edge_padded(rgb, (-1, -2, 11, 8)), expected)


def test_gradcam_map_explains_every_flagged_region_weighed_by_the_map(head_model):
    import dataclasses

    tiles = [crack_on_left(227, seed=s) for s in range(8)]
    photo = Image.fromarray(np.concatenate([np.concatenate(tiles[:4], 1), np.concatenate(tiles[4:], 1)], 0))
    scaled = photo.resize((photo.width * HEAD_SIZE // 227, photo.height * HEAD_SIZE // 227))
    result = scan_scaled(head_model, scaled, photo.size, threshold=0.5)
    rows, cols = result.map_shape
    assert cols >= 8
    # A strong region of many cells on the left, a weaker one-cell region at the right edge.
    probability = np.zeros((rows, cols), dtype=np.float32)
    probability[:, : cols // 2] = np.linspace(0.99, 0.9, rows * (cols // 2)).reshape(rows, cols // 2)
    probability[0, cols - 1] = 0.6
    faked = dataclasses.replace(result, probability=probability)
    heat = gradcam_map_for_photo(head_model, scaled, faked, top_k=2)
    x0, y0, x1, y1 = (round(v * scaled.width / photo.width) for v in faked.patch_box(0, cols - 1))
    weak = heat[max(0, y0):y1, max(0, x0):x1]
    assert weak.max() > 0  # the weaker region got one of the two explanations
    assert weak.max() <= 0.6 + 1e-6  # at the map's probability for it, not at the crop's own
