"""Whole-photo scans: dense maps, geometry, EXIF, huge and broken files, batch outputs."""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import IMAGENET_WEIGHTS, concrete_patch, require
from crackscan.images import ImageError
from crackscan.model import build_model, load_model, load_pretrained_base, make_meta, save_model
from crackscan.predict import expand_paths
from crackscan.scan import (
    _WHOLE_PASS,
    ScanResult,
    heat_colours,
    cell_logits,
    dense_logits,
    decode_scaled,
    probability_png,
    render_overlay,
    scan_paths,
    scan_photo,
    scan_scaled,
)

HEAD_SIZE = 128


@functools.lru_cache(maxsize=1)
def head_trained_model_path() -> Path:
    """ImageNet base + a linear head fitted in seconds on generated patches (crack = dark jagged line)."""
    require(IMAGENET_WEIGHTS)
    import tempfile

    torch.manual_seed(0)
    module = build_model()
    load_pretrained_base(module, IMAGENET_WEIGHTS)
    module.eval().to(memory_format=torch.channels_last)
    rng = np.random.default_rng(1)
    labels = np.array([i % 2 for i in range(48)])
    pixels = np.stack([np.asarray(concrete_patch(rng, HEAD_SIZE, bool(y))) for y in labels])
    meta = make_meta(classes=["Negative", "Positive"], crack_index=1, input_size=HEAD_SIZE)
    from crackscan.transforms import normalize_batch

    with torch.inference_mode():
        pooled = module.features(normalize_batch(pixels, meta["mean"], meta["std"])).mean(dim=(2, 3))
    head = torch.nn.Linear(1280, 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    target = torch.as_tensor(labels)
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(pooled.clone()), target)
        loss.backward()
        optimizer.step()
    module.classifier[1].load_state_dict(head.state_dict())
    path = Path(tempfile.mkdtemp(prefix="crackscan-head-")) / "head.safetensors"
    return save_model(path, module, meta)


@pytest.fixture(scope="module")
def head_model():
    return load_model(head_trained_model_path())


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    return load_model(tiny_model_path)


def grid_photo(path: Path, cells: list[list[bool]], cell: int = 227, seed: int = 0) -> Path:
    """A photo made of ``cell``-px concrete tiles; True tiles carry a crack."""
    rng = np.random.default_rng(seed)
    photo = Image.new("RGB", (cell * len(cells[0]), cell * len(cells)))
    for i, row in enumerate(cells):
        for j, crack in enumerate(row):
            photo.paste(concrete_patch(rng, cell, crack), (j * cell, i * cell))
    photo.save(path, quality=92)
    return path


def test_single_patch_photo_dense_equals_crops_and_predict(tiny_model, tmp_path):
    # A photo exactly one patch large: both methods classify the same pixels with the same padding.
    rng = np.random.default_rng(3)
    path = tmp_path / "one.png"
    concrete_patch(rng, 227, True).save(path)
    dense = scan_photo(tiny_model, path)
    crops = scan_photo(tiny_model, path, method="crops")
    assert dense.map_shape == crops.map_shape == (1, 1)
    scaled, _ = decode_scaled(path, tiny_model.input_size / 227)
    same_pixels = tiny_model.crack_probability(np.asarray(scaled)[None], backend="torch")[0]
    assert dense.probability[0, 0] == pytest.approx(crops.probability[0, 0], abs=1e-5)
    assert dense.probability[0, 0] == pytest.approx(same_pixels, abs=1e-5)
    # predict resizes the patch with PyTorch's kernel where it can, scan the whole photo with PIL's: a few
    # pixel values differ by one level, which moves this random network's probability by a few thousandths.
    direct = tiny_model.predict([path], backend="torch")[0].probability
    assert dense.probability[0, 0] == pytest.approx(direct, abs=0.01)


def test_crop_method_classifies_with_the_backend_asked_for(tiny_model, tmp_path):
    from crackscan.model import CrackModel

    model = CrackModel(module=tiny_model.module, meta=dict(tiny_model.meta))  # no ONNX Runtime session yet
    path = grid_photo(tmp_path / "grid.jpg", [[False, True, False], [True, False, False]])
    in_torch = scan_photo(model, path, method="crops", backend="torch")
    assert model._onnx is None
    in_onnx = scan_photo(model, path, method="crops", backend="onnx")
    assert model._onnx is not None
    np.testing.assert_allclose(in_onnx.probability, in_torch.probability, atol=1e-4)
    # The default is ONNX Runtime, as for every other patch classification.
    fresh = CrackModel(module=tiny_model.module, meta=dict(tiny_model.meta))
    by_default = scan_photo(fresh, path, method="crops")
    assert fresh._onnx is not None
    np.testing.assert_allclose(by_default.probability, in_onnx.probability, atol=1e-6)


@pytest.mark.parametrize("input_size", [64, 80, 96, 112, 144])
def test_dense_map_fits_the_grid_at_any_input_size(tiny_model, tmp_path, input_size):
    # Patches of 2.5 or 4.5 cells (80, 144 px) once got a map one row and column larger than the grid.
    from crackscan.model import CrackModel

    model = CrackModel(module=tiny_model.module, meta=dict(tiny_model.meta, input_size=input_size))
    path = grid_photo(tmp_path / "grid.jpg", [[False, True, False], [True, False, False]])
    for stride in (None, 113):
        dense = scan_photo(model, path, stride=stride, verify=0)
        crops = scan_photo(model, path, stride=stride, method="crops")
        assert dense.map_shape == crops.map_shape, (input_size, stride)


def test_tiled_base_equals_one_pass(head_model, tmp_path):
    # Tiles small enough to force many seams in every stage must give the whole-image result.
    rng = np.random.default_rng(4)
    pixels = np.asarray(concrete_patch(rng, 416, True).resize((480, 352)))
    whole = cell_logits(head_model, pixels, max_values=10**12)
    with torch.inference_mode():
        batch = head_model.preprocess(pixels[None])
        reference = torch.nn.functional.conv2d(head_model.module.features(batch),
                                               head_model.module.classifier[1].weight[:, :, None, None])[0]
    tiled = cell_logits(head_model, pixels, max_values=2_000_000)
    assert whole.shape == tiled.shape == (2, 11, 15)
    assert torch.allclose(whole, reference, atol=1e-4)
    assert torch.allclose(tiled, reference, atol=1e-4)


def _own_copy(model):
    """The same model with its own network, so that no other test's cached sessions belong to it."""
    from crackscan.model import CrackModel

    return CrackModel(module=copy.deepcopy(model.module), meta=dict(model.meta))


@pytest.mark.parametrize("size", [(150, 203), (352, 480)])
def test_whole_onnx_pass_equals_the_tiled_pytorch_pass(tiny_model, size):
    # Sizes that are not multiples of 32 included: each stride-2 layer pads the same way in both.
    model = _own_copy(tiny_model)
    pixels = np.asarray(concrete_patch(np.random.default_rng(7), 256, True).resize(size[::-1]))
    tiled = dense_logits(model, pixels, "onnx", whole_pass_pixels=0, max_values=2_000_000)
    assert model.module not in _WHOLE_PASS  # too large for one pass: PyTorch's tiles
    whole = dense_logits(model, pixels, "onnx")
    assert model.module in _WHOLE_PASS
    assert whole.shape == tiled.shape == (2, -(-size[0] // 32), -(-size[1] // 32))
    scale = float(tiled.abs().max())
    torch.testing.assert_close(whole, tiled, atol=1e-4 * scale, rtol=1e-4)
    # A photo too large for one pass lets the pooled session go, so the tiled pass's memory bound holds.
    dense_logits(model, pixels, "onnx", whole_pass_pixels=0)
    assert model.module not in _WHOLE_PASS


def test_onnx_graphs_follow_weights_changed_after_a_scan(tiny_model, tmp_path):
    # A library user fine-tuning a loaded model between scans gets maps of the new weights, on every backend.
    path = grid_photo(tmp_path / "grid.jpg", [[False, True, False, True], [True, False, False, False]])
    model = _own_copy(tiny_model)
    before = scan_photo(model, path, backend="onnx")
    crops_before = scan_photo(model, path, method="crops", backend="onnx")
    with torch.no_grad():
        model.module.features[-1][0].weight.mul_(-1)  # in place: the same tensors, other values
    for method, old in (("dense", before), ("crops", crops_before)):
        onnx_map = scan_photo(model, path, method=method, backend="onnx").probability  # first: a torch scan of
        torch_map = scan_photo(model, path, method=method, backend="torch").probability  # the photo drops sessions
        np.testing.assert_allclose(onnx_map, torch_map, atol=1e-4, err_msg=method)
        assert not np.allclose(onnx_map, old.probability, atol=0.05), method
    # Through .data, which PyTorch versions apart, a change is not seen: forget_graphs says so.
    for method in ("dense", "crops"):
        scan_photo(model, path, method=method, backend="onnx")  # both graphs exported from the weights now
    with torch.no_grad():
        model.module.features[-1][0].weight.data.mul_(-1)
    model.forget_graphs()
    for method, old in (("dense", before), ("crops", crops_before)):
        onnx_map = scan_photo(model, path, method=method, backend="onnx").probability
        np.testing.assert_allclose(onnx_map, old.probability, atol=1e-4, err_msg=method)  # the first weights again


def test_default_scan_runs_one_onnx_pass_with_the_same_map(tiny_model, tmp_path):
    path = grid_photo(tmp_path / "grid.jpg", [[False, True, False, True], [True, False, False, False]])
    in_torch = _own_copy(tiny_model)
    reference = scan_photo(in_torch, path, backend="torch")
    assert in_torch.module not in _WHOLE_PASS and in_torch._onnx is None
    by_default = _own_copy(tiny_model)
    fast = scan_photo(by_default, path)
    assert by_default.module in _WHOLE_PASS
    np.testing.assert_allclose(fast.probability, reference.probability, atol=1e-4)
    # Over the limit, the tiled PyTorch pass: the same map again.
    tiled = _own_copy(tiny_model)
    scaled, size = decode_scaled(path, tiled.input_size / 227)
    over = scan_scaled(tiled, scaled, size, whole_pass_pixels=0)
    assert tiled.module not in _WHOLE_PASS
    np.testing.assert_allclose(over.probability, fast.probability, atol=1e-4)


def test_scan_paths_with_the_torch_backend_never_starts_onnx_runtime(tiny_model, tmp_path, monkeypatch):
    path = grid_photo(tmp_path / "grid.jpg", [[False, True], [True, False]])
    in_torch = _own_copy(tiny_model)
    summary = scan_paths(in_torch, [path], tmp_path / "out", quiet=True, backend="torch")
    assert in_torch.module not in _WHOLE_PASS and in_torch._onnx is None
    with pytest.raises(ValueError, match="backend"):
        scan_paths(in_torch, [path], tmp_path / "out", backend="tensorrt")
    # Without onnxruntime, "auto" is PyTorch throughout, with the same map.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    without = _own_copy(tiny_model)
    result = scan_photo(without, path)
    assert without.module not in _WHOLE_PASS and without._onnx is None
    np.testing.assert_allclose(result.probability, summary.results[0].probability, atol=1e-6)


def test_onnx_runtime_failures_are_runtime_errors(tiny_model):
    # ONNX Runtime's own exception types derive from Exception only; batches report RuntimeError per file.
    from crackscan.export import cell_logits_runner

    run = cell_logits_runner(tiny_model)
    with pytest.raises(RuntimeError, match=r"ONNX Runtime failed on input \(1, 5, 5\)"):
        run(np.zeros((5, 5), np.uint8))  # no colour axis


def test_work_pixels_pad_only_the_short_axis_by_repeating_its_edges():
    from crackscan.scan import _plan, _work_pixels

    image = np.zeros((40, 200, 3), np.uint8)
    image[:, :, 0] = np.arange(200, dtype=np.uint8)[None, :]  # columns numbered
    image[:, :, 1] = np.arange(40, dtype=np.uint8)[:, None]  # rows numbered
    grid = _plan(200, 40, 64, 32)
    work = _work_pixels(image, grid)
    assert work.shape == (64, 64 + (grid.cols - 1) * 32, 3)
    top = -grid.offset[1]
    assert top == 12 and grid.offset[0] >= 0
    np.testing.assert_array_equal(work[top:top + 40, :, 1], image[:, :work.shape[1], 1])  # the rows, in place
    assert (work[:top, :, 1] == 0).all() and (work[top + 40:, :, 1] == 39).all()  # edges repeated
    np.testing.assert_array_equal(work[0, :, 0], image[0, grid.offset[0]:grid.offset[0] + work.shape[1], 0])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def test_dense_and_crops_maps_agree(head_model, tmp_path):
    # The two maps differ by context: a dense cell's features also see the neighbouring photo, a crop's
    # see zero padding. They must still rank the patches alike, and both must separate cracked tiles.
    layout = [[False, True, False, False], [False, True, False, True], [True, False, False, True]]
    path = grid_photo(tmp_path / "grid.jpg", layout)
    dense = scan_photo(head_model, path, stride=113, threshold=0.5, verify=0)
    crops = scan_photo(head_model, path, stride=113, threshold=0.5, method="crops")
    assert dense.map_shape == crops.map_shape
    assert dense.stride == crops.stride == pytest.approx(2 * 32 * 227 / HEAD_SIZE)
    assert np.corrcoef(_logit(dense.probability).ravel(), _logit(crops.probability).ravel())[0, 1] > 0.5
    inside = np.zeros(dense.map_shape, dtype=bool)
    plain = np.zeros(dense.map_shape, dtype=bool)
    for i in range(dense.map_shape[0]):
        for j in range(dense.map_shape[1]):
            x0, y0, x1, y1 = dense.patch_box(i, j)
            tiles = {layout[int(y // 227)][int(x // 227)] for y in (y0 + 1, y1 - 2) for x in (x0 + 1, x1 - 2)}
            inside[i, j], plain[i, j] = tiles == {True}, tiles == {False}
    for result in (dense, crops):
        values = _logit(result.probability)
        assert values[inside].mean() > values[plain].mean() + 3
    assert dense.verdict and crops.verdict


def test_verification_confirms_region_borders_with_crops(head_model, tmp_path):
    # The dense map flags plain tiles beside cracked ones (they are in its receptive field). Verification
    # puts the crop's value in every border cell it checks, until each region's border is confirmed.
    from scipy import ndimage

    layout = [[False, True, False, False], [False, False, False, False], [False, False, False, True]]
    path = grid_photo(tmp_path / "grid.jpg", layout, seed=5)
    raw = scan_photo(head_model, path, stride=57, threshold=0.5, verify=0)
    crops = scan_photo(head_model, path, stride=57, threshold=0.5, method="crops")
    checked = scan_photo(head_model, path, stride=57, threshold=0.5)
    assert raw.verified == 0 and checked.method == "dense"

    changed = ~np.isclose(checked.probability, raw.probability, atol=1e-6)
    assert 0 < changed.sum() <= checked.verified
    np.testing.assert_allclose(checked.probability[changed], crops.probability[changed], atol=1e-3)
    flagged = checked.probability >= 0.5
    border = flagged & ndimage.binary_dilation(~flagged, structure=np.ones((3, 3), dtype=bool), border_value=1)
    assert border.any()
    np.testing.assert_allclose(checked.probability[border], crops.probability[border], atol=1e-3)
    # Only flagged cells are checked, and rejected ones are exactly those that left the flagged set.
    assert not (changed & (raw.probability < 0.5)).any()
    assert checked.rejected == int(((raw.probability >= 0.5) & ~flagged).sum()) > 0
    assert checked.flagged_fraction < raw.flagged_fraction
    assert checked.to_dict()["verified_cells"] == checked.verified

    # Verification works at the model's threshold; another threshold only judges the same map.
    low = scan_photo(head_model, path, stride=57, threshold=0.2)
    np.testing.assert_array_equal(low.probability, checked.probability)
    assert low.regions == checked.with_threshold(0.2).regions and low.verified == checked.verified

    few = scan_photo(head_model, path, stride=57, threshold=0.5, verify=2)
    assert few.verified == 2
    assert int((~np.isclose(few.probability, raw.probability, atol=1e-6)).sum()) <= 2


def test_geometry_and_regions(tiny_model, tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (1000, 700), (150, 150, 150)).save(path)
    result = scan_photo(tiny_model, path)
    scale = 64 / 227
    step = 32 / scale
    assert result.photo_size == (1000, 700)
    assert result.stride == pytest.approx(step)
    assert result.map_shape == ((round(700 * scale) - 64) // 32 + 1, (round(1000 * scale) - 64) // 32 + 1)
    rows, cols = result.map_shape
    x0, y0, _, _ = result.patch_box(0, 0)
    _, _, x1, y1 = result.patch_box(rows - 1, cols - 1)
    assert 0 <= x0 < step and 0 <= y0 < step and 1000 - step < x1 <= 1000 + 1 and 700 - step < y1 <= 700 + 1
    # Replace the map with two known blobs and judge it again.
    probability = np.zeros((rows, cols), dtype=np.float32)
    probability[0:2, 0:2] = [[0.9, 0.8], [0.7, 0.95]]
    probability[rows - 1, cols - 1] = 0.6
    judged = ScanResult(**{**result.__dict__, "probability": probability}).with_threshold(0.5)
    xs, ys = judged.cell_edges()
    assert xs[0] == 0 and xs[-1] == 1000 and ys[0] == 0 and ys[-1] == 700 and np.all(np.diff(xs) > 0)
    assert judged.verdict and len(judged.regions) == 2
    first, second = judged.regions
    assert first["box"] == [0, 0, round(xs[2]), round(ys[2])]
    assert first["max_probability"] == pytest.approx(0.95) and first["cells"] == 4
    assert first["mean_probability"] == pytest.approx(0.8375)
    assert second["box"] == [round(xs[-2]), round(ys[-2]), 1000, 700]
    assert judged.flagged_fraction == pytest.approx(first["area_fraction"] + second["area_fraction"], abs=1e-5)
    assert judged.with_threshold(0.96).verdict is False
    everything = judged.with_threshold(0.0)
    assert everything.flagged_fraction == pytest.approx(1.0)
    assert everything.regions[0]["box"] == [0, 0, 1000, 700]
    record = json.loads(json.dumps(judged.to_dict()))
    assert record["verdict"] == "crack" and record["map_shape"] == [rows, cols]


def test_exif_rotated_photo(tiny_model, tmp_path):
    # Stored 600 wide x 400 high with a dark block at its top-left; orientation 6 shows it rotated 90
    # degrees clockwise: 400 wide x 600 high, with the block at the top-right.
    stored = Image.new("RGB", (600, 400), (200, 200, 200))
    ImageDraw.Draw(stored).rectangle([0, 0, 150, 100], fill=(0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    result = scan_photo(tiny_model, path, patch_size=100)
    assert result.photo_size == (400, 600)
    rows, cols = result.map_shape
    assert rows > cols
    scaled, size = decode_scaled(path, 64 / 100)
    assert size == (400, 600) and scaled.size == (256, 384)
    pixels = np.asarray(scaled, dtype=np.float32).mean(axis=2)
    assert pixels[:30, -30:].mean() < 40 and pixels[:30, :30].mean() > 150


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(tiny_model, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(60000, 60000))
    with pytest.raises(ImageError) as err:
        scan_photo(tiny_model, path)
    message = str(err.value)
    assert "bomb.png" in message and "refused" in message and "\n" not in message


def test_too_small_patch_for_photo_is_refused(tiny_model, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (400, 300)).save(path)
    with pytest.raises(ImageError, match="larger patch size"):
        scan_photo(tiny_model, path, patch_size=8, max_pixels=1_000_000)


MEMORY_SCRIPT = """
import sys
import numpy as np
from crackscan.model import load_model
from crackscan.scan import scan_photo

def status(key):
    # /proc, not getrusage: ru_maxrss carries the parent's (pytest's) peak over fork+exec.
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key)) / 1024

model = load_model(sys.argv[1])
model.crack_probability(np.zeros((1, 64, 64, 3), np.uint8), backend="torch")
before = status("VmHWM")
result = scan_photo(model, sys.argv[2], patch_size=64)
print(result.map_shape[0], result.map_shape[1], round(status("VmHWM") - before))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_large_photo_scanned_in_tiles_with_bounded_memory(tiny_model_path, tmp_path):
    # 6 MP scanned at scale 1 (patch 64 = input 64): one pass would need ~0.6 GB for its largest
    # activation alone (24 values per pixel); the tiles keep the growth to a fraction of that.
    path = tmp_path / "large.jpg"
    rng = np.random.default_rng(0)
    small = rng.integers(100, 200, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(small).resize((3000, 2000), Image.Resampling.NEAREST).save(path, quality=80)
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tiny_model_path), str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, cols, grown_mb = map(int, done.stdout.split()[-3:])
    assert (rows, cols) == ((2000 - 64) // 32 + 1, (3000 - 64) // 32 + 1)
    print(f"peak RSS grew by {grown_mb} MB")
    assert grown_mb < 500, grown_mb  # measured ~340 MB; one untiled pass needs well over 1 GB


def test_a_photo_whose_results_cannot_be_written_is_reported_and_the_batch_goes_on(tiny_model_path, tmp_path, capsys):
    from crackscan.cli import main

    folder, out = tmp_path / "photos", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(4)
    long_name = "x" * 245 + ".jpg"  # its stem plus ".overlay.jpg" would pass the 255 bytes a name may have
    for name in ("a.jpg", "b.jpg", long_name):
        concrete_patch(rng, 300, True).resize((400, 300)).save(folder / name)
    (out / "b.overlay.jpg").mkdir(parents=True)  # b's overlay cannot be written: a folder has its name
    assert main(["scan", str(tiny_model_path), str(folder), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {folder / 'b.jpg'}: scanned, but its results could not be written (Is a directory)",
                   "1 file(s) failed (see above and summary.csv)"]
    with open(out / "summary.csv", newline="") as handle:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(handle)}
    assert rows["b.jpg"]["verdict"] == "error" and "could not be written" in rows["b.jpg"]["error"]
    assert rows["a.jpg"]["error"] == "" and (out / "a.json").is_file()
    stem = "x" * 200  # cut to fit
    assert rows[long_name]["error"] == "" and rows[long_name]["overlay"] == f"{stem}.overlay.jpg"
    assert json.loads((out / f"{stem}.json").read_text())["file"].endswith(long_name)
    assert (out / f"{stem}.map.png").is_file() and (out / "contact_sheet.jpg").is_file()


def test_folder_with_corrupt_file(tiny_model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.jpg", "b.png"):
        concrete_patch(rng, 300, True).resize((500, 400)).save(folder / name)
    good = (folder / "a.jpg").read_bytes()
    (folder / "c_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "d_text.jpg").write_text("not an image")
    out = tmp_path / "out"
    summary = scan_paths(tiny_model, list(expand_paths([folder])), out, quiet=True)
    assert [Path(r.source).name for r in summary.results] == ["a.jpg", "b.png"]
    assert len(summary.errors) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2
    assert "c_truncated.jpg" in errors[0] and "d_text.jpg" in errors[1]
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["file"]).name for r in rows] == ["a.jpg", "b.png", "c_truncated.jpg", "d_text.jpg"]
    assert rows[0]["error"] == "" and rows[0]["verdict"] in ("crack", "no crack")
    assert rows[2]["verdict"] == "error" and "truncated" in rows[2]["error"]
    for stem in ("a", "b"):
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["photo_size"] == [500, 400]
        assert Image.open(out / f"{stem}.overlay.jpg").width == 500
        assert Image.open(out / f"{stem}.map.png").size[::-1] == tuple(record["map_shape"])
    assert not (out / "c_truncated.json").exists()
    assert [r["overlay"] for r in rows] == ["a.overlay.jpg", "b.overlay.jpg", "", ""]
    assert (out / "contact_sheet.jpg").is_file()
    # One photo into the same folder: no sheet of the earlier batch's photos is left beside its summary.
    scan_paths(tiny_model, [folder / "a.jpg"], out, quiet=True)
    assert not (out / "contact_sheet.jpg").exists()


def test_probability_png_round_trip(tiny_model, tmp_path):
    result = scan_photo(tiny_model, _save(tmp_path / "p.png", (700, 500)))
    probability = np.linspace(0, 1, result.probability.size, dtype=np.float32).reshape(result.map_shape)
    result = ScanResult(**{**result.__dict__, "probability": probability})
    decoded = np.asarray(Image.open(io.BytesIO(probability_png(result))), dtype=np.float32) / 255
    assert decoded.shape == result.map_shape
    assert np.abs(decoded - probability).max() <= 0.5 / 255 + 1e-6


def _save(path: Path, size: tuple[int, int]) -> Path:
    Image.new("RGB", size, (150, 150, 150)).save(path)
    return path


def test_overlay_tints_flagged_cells_only(tiny_model, tmp_path):
    photo = Image.new("RGB", (1200, 800), (128, 128, 128))
    path = tmp_path / "grey.png"
    photo.save(path)
    result = scan_photo(tiny_model, path)
    probability = np.zeros(result.map_shape, dtype=np.float32)
    probability[0, 0] = 1.0
    result = ScanResult(**{**result.__dict__, "probability": probability}).with_threshold(0.5)
    overlay = render_overlay(photo, result, max_side=600)
    assert overlay.width == 600 and overlay.height > 400  # photo part 600x400, plus the legend band
    pixels = np.asarray(overlay, dtype=np.int32)
    x0, y0, x1, y1 = result.regions[0]["box"]
    inside = pixels[int(y0 / 2) + 5:int(y1 / 2) - 5, int(x0 / 2) + 5:int(x1 / 2) - 5]
    assert np.abs(inside - 128).max() > 40  # tinted
    assert np.abs(pixels[300:390, 300:590] - 128).max() <= 2  # untouched photo far from the region
    heat = np.zeros((80, 120), np.float32)
    heat[60:, 100:] = 1.0
    with_heat = np.asarray(render_overlay(photo, result, heatmap=heat, max_side=600), dtype=np.int32)
    assert np.abs(with_heat[330:395, 530:595] - 128).max() > 40


def test_overlay_colours_each_cell_by_its_own_probability(tiny_model):
    # A textured photo and a map whose every cell differs: each flagged cell's square is the photo half
    # covered by its probability's colour; unflagged squares are the photo itself.
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (700, 900, 3), dtype=np.uint8))
    result = scan_scaled(tiny_model, photo, photo.size, patch_size=200)
    probability = rng.random(result.map_shape).astype(np.float32)
    result = ScanResult(**{**result.__dict__, "probability": probability, "regions": []})
    result.threshold = 0.5
    overlay = np.asarray(render_overlay(photo, result, max_side=900), dtype=np.float64)[:700]
    original = np.asarray(photo, dtype=np.float64)
    xs, ys = result.cell_edges()
    checked = 0
    for i in range(result.map_shape[0]):
        for j in range(result.map_shape[1]):
            top, bottom, left, right = int(np.ceil(ys[i])), int(np.ceil(ys[i + 1])) - 1, int(np.ceil(xs[j])), int(np.ceil(xs[j + 1])) - 1
            if bottom < top or right < left:
                continue  # a cell whose square lies outside the photo
            opacity = 128 / 255 if probability[i, j] >= 0.5 else 0.0
            colour = heat_colours(probability[i, j]).astype(np.float64)
            # The square's centre and its four corners: the cell owns its square up to the pixel at each edge.
            for y, x in [((top + bottom) // 2, (left + right) // 2), (top, left), (top, right), (bottom, left), (bottom, right)]:
                expected = original[y, x] * (1 - opacity) + colour * opacity
                assert np.abs(overlay[y, x] - expected).max() <= 1.5, (i, j, y, x, probability[i, j])
                checked += 1
    assert checked >= 5 * 40


def test_gradcam_overlay_blends_the_heat_map_by_its_value(tiny_model):
    photo = Image.new("RGB", (400, 300), (100, 100, 100))
    result = scan_scaled(tiny_model, photo, photo.size, patch_size=100)
    result = ScanResult(**{**result.__dict__, "regions": []})  # no outlines over the pixels read below
    heat = np.tile(np.linspace(0, 1, 400, dtype=np.float32), (300, 1))  # left 0 to right 1
    overlay = np.asarray(render_overlay(photo, result, heatmap=heat, max_side=400), dtype=np.float64)
    for x in (0, 100, 250, 399):
        value = heat[150, x]
        expected = 100 * (1 - 0.65 * value) + heat_colours(value).astype(np.float64) * 0.65 * value
        assert np.abs(overlay[150, x] - expected).max() <= 2.5, (x, value)


@pytest.mark.parametrize(("patch_size", "photo_width"), [(227, 2000), (900, 2048)])
def test_a_batch_overlay_is_sharp_and_decodes_again_only_when_it_must(tiny_model, tmp_path, patch_size, photo_width):
    # A 4000x3000 JPEG: at the default patch size the scan's own half-size draft (2000 px) serves the
    # overlay; at 900 px a patch the scan reads an eighth-size draft (500 px), so the overlay is decoded
    # again at its full 2048 px.
    rng = np.random.default_rng(0)
    # Grey detail 2 px across at the half-size draft's scale: kept by JPEG (no colour to subsample), lost at 1128 px.
    fine = np.repeat(rng.integers(60, 200, (750, 1000, 1), dtype=np.uint8), 3, axis=2)
    path = tmp_path / "big.jpg"
    Image.fromarray(fine).resize((4000, 3000), Image.Resampling.NEAREST).save(path, quality=90)
    summary = scan_paths(tiny_model, [path], tmp_path / "out", patch_size=patch_size, threshold=1.0, quiet=True)
    assert not summary.errors
    with Image.open(tmp_path / "out" / "big.overlay.jpg") as overlay:
        assert overlay.width == photo_width
        photo_part = np.asarray(overlay.convert("RGB"))[: overlay.width * 3 // 4].astype(np.int32)
    size = (photo_width, photo_width * 3 // 4)
    with Image.open(path) as original:
        sharp = np.asarray(original.convert("RGB").resize(size), np.int32)
        # What an overlay enlarged from the scan's own image (1128 px at the default patch size) would be.
        blurred = np.asarray(original.convert("RGB").resize((1128, 846)).resize(size), np.int32)
    assert np.abs(photo_part - sharp).mean() < 0.5 * np.abs(blurred - sharp).mean()


def test_overlay_of_a_tiny_image_is_enlarged_for_its_legend(tiny_model):
    photo = Image.new("RGB", (60, 40), (128, 128, 128))
    result = scan_scaled(tiny_model, photo, photo.size, patch_size=40, threshold=0.0)  # flagged: tinted
    overlay = render_overlay(photo, result)
    assert overlay.width == 480 and overlay.height > 320  # 480x320 photo part, then the legend band
    assert np.abs(np.asarray(overlay, dtype=np.int32)[100:220, 100:380] - 128).max() > 40


def test_bad_arguments(tiny_model, tmp_path):
    path = _save(tmp_path / "p.png", (300, 300))
    with pytest.raises(ValueError, match="method"):
        scan_photo(tiny_model, path, method="sliding")
    with pytest.raises(ValueError, match="threshold"):
        scan_photo(tiny_model, path, threshold=1.5)
    with pytest.raises(ValueError, match="map kind"):
        scan_paths(tiny_model, [path], tmp_path / "o", map_kind="saliency")
    with pytest.raises(ValueError, match="verify"):
        scan_photo(tiny_model, path, verify=-1)


def test_scan_scaled_small_photo_gets_one_padded_patch(tiny_model):
    result = scan_scaled(tiny_model, np.full((40, 50, 3), 120, np.uint8), (142, 113), patch_size=227)
    assert result.map_shape == (1, 1)
    assert result.map_origin[0] < 0 and result.map_origin[1] < 0


@pytest.mark.parametrize("size", [(300, 200), (400, 150), (150, 300)])
def test_photo_shorter_than_a_patch_on_one_side_only(tiny_model, tmp_path, size):
    # One side shorter than a patch and the other longer once failed inside np.pad ("negative values").
    path = tmp_path / "strip.jpg"
    Image.fromarray(np.asarray(concrete_patch(np.random.default_rng(3), 256, True).resize(size))).save(path)
    dense = scan_photo(tiny_model, path)
    crops = scan_photo(tiny_model, path, method="crops")
    longer, shorter = max(size), min(size)
    assert shorter < 227 < longer
    cells = max(1, (round(longer * tiny_model.input_size / 227) - tiny_model.input_size) // 32 + 1)
    expected = (1, cells) if size[0] > size[1] else (cells, 1)
    assert dense.map_shape == crops.map_shape == expected
    assert dense.photo_size == size


def test_scan_notes_an_image_smaller_than_a_patch(tiny_model, tmp_path, capsys):
    # A lone 120-px crop scanned at 227 px per patch is a sliver of a patch: say so rather than stay silent.
    small, photo = tmp_path / "small.jpg", tmp_path / "photo.jpg"
    concrete_patch(np.random.default_rng(6), 120, True).save(small)
    concrete_patch(np.random.default_rng(6), 256, True).resize((500, 400)).save(photo)
    scan_paths(tiny_model, [small, photo], tmp_path / "out", quiet=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: {small}: 120x120 px is smaller than one 227-px patch")
    assert "crackscan predict" in err[0]
    assert "smaller than one 227-px patch" in json.loads((tmp_path / "out" / "small.json").read_text())["note"]
    assert "note" not in json.loads((tmp_path / "out" / "photo.json").read_text())


def test_probabilities_are_shown_rounded_down():
    from crackscan.scan import shown

    assert shown(0.99979) == "0.999" and shown(1.0) == "1.000" and shown(0.5) == "0.500"
    assert shown(0.123456, 2) == "0.12"


def test_verify_with_the_crop_method_is_refused(tiny_model_path, tmp_path, capsys):
    from crackscan.cli import main

    path = _save(tmp_path / "p.png", (300, 300))
    assert main(["scan", str(tiny_model_path), str(path), "--method", "crops", "--verify", "10",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--verify" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_scans_at_the_training_scale_unless_told(tiny_model_path, tmp_path, capsys):
    from crackscan.cli import main
    from crackscan.scan import PATCH_SIZE

    path = _save(tmp_path / "p.png", (500, 400))
    for extra, expected in (([], PATCH_SIZE), (["--patch-size", "113"], 113)):
        out = tmp_path / f"out{expected}"
        assert main(["scan", str(tiny_model_path), str(path), "--out", str(out), "--quiet", *extra]) == 0
        assert json.loads((out / "p.json").read_text())["patch_size"] == expected
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    assert f"training scale, {PATCH_SIZE} px" in " ".join(capsys.readouterr().out.split())  # the help names it


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_an_oriented_tiff_or_png_is_scanned_upright_and_unstretched(tmp_path, monkeypatch, fmt):
    import crackscan.scan as scan_module

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.img", fmt, exif=exif.tobytes())
    decoded, scaled, size = scan_module._decode(tmp_path / "r.img", 0.5)
    assert decoded.size == size == (300, 500) and scaled.size == (150, 250)
    # Pillow versions differ in turning TIFFs upright while loading: when the header's reading of the orientation
    # disagrees with the decoded pixels, the pixels decide and the photo is not stretched to the other shape.
    monkeypatch.setattr(scan_module, "oriented_size", lambda data, **options: (500, 300))
    decoded, scaled, size = scan_module._decode(tmp_path / "r.img", 0.5)
    assert decoded.size == size == (300, 500) and scaled.size == (150, 250)
