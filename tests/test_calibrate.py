"""The scan's verdict threshold: chosen on photo-sized mosaics, stored in the model, used by scan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import concrete_patch
from crackscan.calibrate import (GRID, ScanCalibration, calibrate_scan, choose_threshold, photo_mosaic, photo_score,
                                 store, tile_cells_max)
from crackscan.model import CrackModel, ModelError, load_model, read_meta, save_model
from crackscan.scan import ScanResult, scan_scaled


@pytest.mark.parametrize("free, found, floor, want", [
    # Every photo is right at the floor: the floor stays.
    ([0.1, 0.2], [0.9, 1.0], 0.5, 0.5),
    # A crack-free photo at 0.6 is passed by any threshold in (0.6, 0.9], which keeps both cracks: the midpoint.
    ([0.6, 0.2], [0.9, 1.0], 0.5, 0.75),
    # 0.65 (one crack-free flagged, both cracks found) ties 0.85 (none flagged, one crack missed): the lower wins.
    ([0.6, 0.8], [0.7, 0.9], 0.5, 0.65),
    # A better balance above a crack: 0.97 passes both crack-free photos and loses one crack of three.
    ([0.6, 0.95], [0.9, 0.99, 1.0], 0.5, 0.97),
    # Never below the patch threshold, even where everything scores under it.
    ([0.1], [0.3], 0.5, 0.5),
])
def test_choose_threshold_takes_the_lowest_best_balanced_threshold(free, found, floor, want):
    threshold, balanced = choose_threshold(np.array(free), np.array(found), floor)
    assert threshold == pytest.approx(want)
    passed = np.mean(np.array(free) < threshold)
    caught = np.mean(np.array(found) >= threshold)
    assert balanced == pytest.approx((passed + caught) / 2)


def test_choose_threshold_needs_both_kinds_of_photo():
    with pytest.raises(ValueError, match="crack-free photos and photos with a crack"):
        choose_threshold(np.array([]), np.array([0.9]), 0.5)


def test_photo_mosaic_lays_negatives_and_the_crack_where_asked():
    size = 4
    pixels = np.stack([np.full((size, size, 3), 10 * i, np.uint8) for i in range(6)])
    negatives = np.array([1, 2, 3])
    mosaic = photo_mosaic(pixels, negatives, np.random.default_rng(0), crack=(5, 2, 7))
    cols, rows = GRID
    assert mosaic.shape == (rows * size, cols * size, 3)
    tiles = mosaic[::size, ::size, 0] // 10  # one pixel per tile: which patch lies there
    assert tiles[2, 7] == 5
    others = np.delete(tiles.ravel(), 2 * cols + 7)
    assert set(others) == {1, 2, 3}
    # Each tile is one patch, whole.
    assert (mosaic.reshape(rows, size, cols, size, 3) == tiles[:, None, :, None, None] * 10).all()


def test_tile_cells_max_reads_only_the_cells_centred_in_the_tile():
    # 96-px tiles, cells 32 px apart whose 96-px patches start at (0, 0): cell (i, j) is centred at
    # (48 + 32 j, 48 + 32 i), so tile (1, 2) (x 192..288, y 96..192) holds the centres of rows 2-4, cols 5-7.
    probability = np.zeros((10, 14), np.float32)
    probability[2:5, 5:8] = 0.3
    probability[3, 6] = 0.8
    probability[1, 6] = 0.99  # centred in the tile above
    probability[3, 8] = 0.97  # centred in the tile to the right
    result = ScanResult(source="x", photo_size=(14 * 32 + 64, 10 * 32 + 64), patch_size=96, stride=32.0,
                        probability=probability, threshold=0.5, scale=1.0, map_origin=(0.0, 0.0), method="dense",
                        head="dense", seconds=0.0)
    assert tile_cells_max(result, 1, 2, 96) == pytest.approx(0.8)
    assert tile_cells_max(result, 0, 2, 96) == pytest.approx(0.99)


def test_a_crack_photo_is_scored_by_its_crack_tile_not_by_the_rest_of_the_photo():
    # Plain tiles everywhere, one cracked tile in a corner: the photo's score is the corner's, but a crack
    # tile laid (as a plain patch, mislabelled) in the far corner is scored by its own cells and is not found.
    model = load_model()
    rng = np.random.default_rng(3)
    plain = np.stack([np.asarray(concrete_patch(rng, model.input_size, False)) for _ in range(8)])
    cracked = np.asarray(concrete_patch(rng, model.input_size, True))
    pixels = np.concatenate([plain, cracked[None]])
    mosaic = photo_mosaic(pixels, np.arange(8), rng, crack=(8, 0, 0))
    cols, rows = GRID
    assert photo_score(model, mosaic, None) > 0.9
    assert photo_score(model, mosaic, (0, 0)) > 0.9
    assert photo_score(model, mosaic, (rows - 1, cols - 1)) < 0.5


def test_calibration_with_the_shipped_model_finds_the_crack_tiles_and_passes_plain_photos():
    model = load_model()
    rng = np.random.default_rng(0)
    is_crack = np.array([i % 2 == 0 for i in range(12)])
    pixels = np.stack([np.asarray(concrete_patch(rng, model.input_size, bool(c))) for c in is_crack])
    calibration = calibrate_scan(model, pixels, is_crack, np.arange(12), photos=4)
    assert len(calibration.crack_free_max) == 2 and len(calibration.crack_tile_max) == 2
    assert calibration.crack_free_max.max() < 0.5 < 0.9 < calibration.crack_tile_max.min()
    # Plain photos are already passed at the patch threshold: the lowest best threshold is that one.
    assert calibration.threshold == model.threshold and calibration.balanced_accuracy == 1.0
    meta = calibration.to_meta()
    assert meta["at_scan_threshold"] == {"crack_free_flagged": 0, "crack_found": 2} and meta["photos"] == 4
    with pytest.raises(ValueError, match="crack and crack-free"):
        calibrate_scan(model, pixels, is_crack, np.arange(0, 12, 2), photos=4)
    # At most two photos per crack patch: one crack patch among the rows, two photos however many are asked for.
    assert calibrate_scan(model, pixels, is_crack, np.array([0, 1, 3, 5]), photos=50).photos == 2


@pytest.fixture()
def calibrated_copy(tiny_model_path, tmp_path):
    """The tiny model with a scan threshold of 0.9 in its metadata, and without one."""
    plain = load_model(tiny_model_path)
    meta = dict(plain.meta, scan_threshold=0.9, scan_threshold_source="test")
    return load_model(save_model(tmp_path / "calibrated.safetensors", plain.module, meta)), plain


def test_scan_judges_at_the_models_scan_threshold(calibrated_copy):
    calibrated, plain = calibrated_copy
    assert calibrated.scan_threshold == 0.9 and plain.scan_threshold == plain.threshold == 0.5
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    at_patch = scan_scaled(plain, photo, (400, 300), patch_size=64, backend="torch")
    # A scan threshold in the middle of this map, so that judging at it and at the patch threshold differ.
    middle = float(np.median(at_patch.probability))
    model = CrackModel(module=plain.module, meta=dict(plain.meta, scan_threshold=middle))
    at_scan = scan_scaled(model, photo, (400, 300), patch_size=64, backend="torch")
    assert np.array_equal(at_scan.probability, at_patch.probability)
    assert at_scan.threshold == middle and at_patch.threshold == 0.5
    assert 0 < at_scan.flagged_fraction < 1 and at_scan.flagged_fraction != at_patch.flagged_fraction
    assert at_scan.flagged_fraction == at_patch.with_threshold(middle).flagged_fraction
    assert scan_scaled(model, photo, (400, 300), patch_size=64, threshold=0.5, backend="torch").threshold == 0.5


def test_scan_json_and_cli_say_the_scan_threshold(calibrated_copy, tmp_path, capsys):
    from PIL import Image

    from crackscan.cli import main

    calibrated, plain = calibrated_copy
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 260, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    args = [str(tmp_path / "p.png"), "--patch-size", "64", "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(["scan", calibrated.path, *args]) == 0
    assert json.loads((tmp_path / "out" / "p.json").read_text())["threshold"] == 0.9
    assert "cells flagged at 0.900 (the model's scan threshold)" in capsys.readouterr().out
    assert main(["scan", calibrated.path, *args, "--threshold", "0.3"]) == 0
    assert "cells flagged at 0.300 (--threshold)" in capsys.readouterr().out
    assert main(["scan", plain.path, *args]) == 0
    assert "cells flagged at 0.500 (the model's threshold)" in capsys.readouterr().out


def test_store_writes_the_threshold_and_its_figures(tiny_model_path, tmp_path):
    model = load_model(tiny_model_path)
    calibration = ScanCalibration(threshold=0.7, balanced_accuracy=0.9, crack_free_max=np.array([0.6, 0.8]),
                                  crack_tile_max=np.array([0.95, 0.65]), patch_threshold=0.5, seconds=1.0)
    store(model, calibration, "a test")
    model.save(tmp_path / "m.safetensors")
    meta = read_meta(tmp_path / "m.safetensors")
    assert meta["scan_threshold"] == 0.7 and meta["scan_threshold_source"] == "a test"
    assert meta["scan_calibration"]["at_scan_threshold"] == {"crack_free_flagged": 1, "crack_found": 1}
    assert meta["scan_calibration"]["at_patch_threshold"] == {"crack_free_flagged": 2, "crack_found": 2}
    assert load_model(tmp_path / "m.safetensors").scan_threshold == 0.7
    # Stored as chosen: never rounded below the patch threshold it was floored at.
    floor = 0.12345649
    store(model, ScanCalibration(threshold=floor, balanced_accuracy=1.0, crack_free_max=np.array([0.1]),
                                 crack_tile_max=np.array([0.9]), patch_threshold=floor, seconds=1.0), "a test")
    assert model.meta["scan_threshold"] >= floor


@pytest.mark.parametrize("bad", [1.5, -0.1, "high"])
def test_a_bad_scan_threshold_is_refused_on_load(tiny_model_path, tmp_path, bad):
    model = load_model(tiny_model_path)
    path = save_model(tmp_path / "bad.safetensors", model.module, dict(model.meta, scan_threshold=bad))
    with pytest.raises(ModelError, match="scan_threshold"):
        load_model(path)


def test_a_model_object_without_a_file_uses_its_meta(tiny_model_path):
    model = load_model(tiny_model_path)
    copy = CrackModel(module=model.module, meta=dict(model.meta, scan_threshold=0.66))
    assert copy.scan_threshold == 0.66 and copy.threshold == model.threshold
