"""Every command over the hostile corpus (tests/corpus.py): odd files are used, broken ones reported.

The command lines run through ``crackscan.cli.main`` in a separate process (all of them in one, to pay
for importing torch once), with stdout and stderr captured at the descriptor level, so exit codes,
messages and the absence of tracebacks are what a user sees. As root, that process runs without the
capabilities that let root read mode-000 files, so the unreadable file really is unreadable.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGENET_WEIGHTS, make_dataset
from corpus import (
    EXIF_STORED_SIZE,
    Entry,
    build_corpus,
    corpus_entries,
    drop_privileges_prefix,
    permission_is_enforced,
    printable,
)
from crackscan.images import ImageError, load_image, load_patch, oriented_size

ENTRIES = corpus_entries()
GOOD = [e for e in ENTRIES if e.ok]
BAD = [e for e in ENTRIES if not e.ok]


def ids(entries: list[Entry]) -> list[str]:
    return [e.name for e in entries]


@pytest.fixture(scope="module")
def prefix() -> list[str]:
    return drop_privileges_prefix()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "corpus"
    build_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def enforced(corpus, prefix) -> bool:
    return permission_is_enforced(corpus / "unreadable.jpg", prefix)


def skip_if_readable(entry: Entry, enforced: bool) -> None:
    if entry.name == "unreadable.jpg" and not enforced:
        pytest.skip("mode 000 does not stop this process from reading (root without setpriv): nothing to test")


def expected_bad(enforced: bool, entries: list[Entry] = BAD) -> list[Entry]:
    return [e for e in entries if enforced or e.name != "unreadable.jpg"]


@dataclass
class Run:
    """One command line's exit code and output."""

    code: int | str
    out: str
    err: str
    seconds: float


def run_batch(prefix: list[str], jobs: dict[str, list[str]], folder: Path, timeout: float = 400) -> dict[str, Run]:
    """Run command lines through ``crackscan.cli.main`` in one fresh process (see tests/cli_batch.py)."""
    (folder / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    command = [*prefix, sys.executable, str(Path(__file__).with_name("cli_batch.py")),
               str(folder / "jobs.json"), str(folder / "results.json")]
    # One thread: several processes' OpenMP threads spinning on a shared machine's cores slow each other
    # down many times over; the behaviour under test does not depend on the thread count.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    assert done.returncode == 0, f"the batch process failed: {done.stderr[-3000:]}"
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    return {name: Run(**r) for name, r in results.items()}


def lines_naming(text: str, path: str) -> list[str]:
    return [line for line in text.splitlines() if path in line]


def assert_no_traceback(run: Run) -> None:
    assert run.code != "crashed" and "Traceback" not in run.out + run.err, run.err[-3000:]


def weights_arg() -> str:
    return str(IMAGENET_WEIGHTS) if IMAGENET_WEIGHTS.exists() else "none"


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------------------------------
# The decode path itself: what the oddities decode to


def test_16_bit_png_is_scaled_not_clipped(corpus):
    for name in ("gray16.png", "rgb16.png"):
        pixels = np.asarray(load_image(corpus / name))
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
        # 0x8080 of 65535 is mid grey: 128 when scaled; clipping the raw value would give 255.
        assert np.abs(pixels.astype(int) - 128).max() <= 1, (name, pixels.min(), pixels.max())


@pytest.mark.parametrize("name", ["exif-rotated.jpg", "exif-odd-tag.jpg"])
def test_exif_orientation_is_applied(corpus, name):
    for reduce_to in (None, (64, 64)):
        image = load_image(corpus / name, reduce_to=reduce_to)
        assert image.size == EXIF_STORED_SIZE[::-1]
        pixels = np.asarray(image).astype(int)
        # Orientation 6 turns the stored dark left edge into the top edge.
        assert pixels[:6].mean() < 40 < pixels[-6:].mean()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_exif_orientation_of_other_formats_is_applied_once(corpus, tmp_path, fmt):
    # Pillow turns a TIFF upright itself while loading (and drops its tag); PNG and WebP keep the tag for us.
    stored = np.asarray(load_image(corpus / "exif-rotated.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / f"r.{fmt.lower()}", fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    upright = load_image(tmp_path / f"r.{fmt.lower()}")
    assert upright.size == stored.shape[1::-1] and np.array_equal(np.asarray(upright), stored)
    assert oriented_size((tmp_path / f"r.{fmt.lower()}").read_bytes()) == upright.size


def test_an_orientation_stored_as_text_is_no_orientation(corpus):
    image = load_image(corpus / "exif-orientation-text.jpg")
    assert image.size == EXIF_STORED_SIZE
    pixels = np.asarray(image).astype(int)
    assert pixels[:, :6].mean() < 40 < pixels[:, -6:].mean()


def test_cmyk_and_alpha_decode_to_sensible_rgb(corpus):
    original = np.asarray(Image.open(corpus / "plain.jpg").convert("RGB")).astype(int)
    cmyk = np.asarray(load_image(corpus / "cmyk.jpg")).astype(int)
    # An inverted (Adobe) CMYK JPEG read naively comes out as a negative: far from the source.
    assert np.abs(cmyk.mean(axis=(0, 1)) - original.mean(axis=(0, 1))).max() < 15
    alpha = np.asarray(load_image(corpus / "alpha.png"))
    assert alpha.shape == (48, 48, 3) and alpha[0, 0].min() > 240  # transparent corner composited on white


@pytest.mark.parametrize("entry", GOOD, ids=ids(GOOD))
def test_every_oddity_decodes_to_a_patch(corpus, entry):
    patch = load_patch(corpus / entry.name, 64)
    assert patch.shape == (64, 64, 3) and patch.dtype == np.uint8


@pytest.mark.parametrize("entry", BAD, ids=ids(BAD))
def test_every_broken_file_raises_image_error(corpus, entry):
    if entry.name == "unreadable.jpg" and os.access(corpus / entry.name, os.R_OK):
        pytest.skip("this test process can read mode-000 files (root); the CLI tests cover it without the capability")
    with pytest.raises(ImageError) as caught:
        load_image(corpus / entry.name, reduce_to=(64, 64))
    message = str(caught.value)
    assert "\n" not in message and str(corpus / entry.name) in message and entry.reason in message.lower()


def test_bombs_are_refused_from_a_tiny_file(corpus):
    for name in ("bomb.png", "bomb.jpg"):
        assert (corpus / name).stat().st_size < 2000
    # The headers claim 60000x60000 (read from the bytes: PIL itself refuses to open such a file).
    png = (corpus / "bomb.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == int.from_bytes(png[20:24], "big") == 60000
    jpeg = (corpus / "bomb.jpg").read_bytes()
    sof = jpeg.find(b"\xff\xc0")
    assert int.from_bytes(jpeg[sof + 5 : sof + 7], "big") == int.from_bytes(jpeg[sof + 7 : sof + 9], "big") == 60000



def test_bombs_are_refused_in_crackscans_words(corpus):
    # Pillow refuses headers over twice its own limit before crackscan sees the size; the message is still ours.
    for name in ("bomb.png", "bomb.jpg"):
        with pytest.raises(ImageError, match=r"refused: image too large \(3600 MP, over the 120-MP limit\)$"):
            load_image(corpus / name)
        # A caller's limit above Pillow's: the message names the limit that refused it, Pillow's.
        with pytest.raises(ImageError, match=r"\(3600 MP, over the 179-MP limit\)$"):
            load_image(corpus / name, max_pixels=10**10)

# ----------------------------------------------------------------------------------------------------
# Every command over the corpus, in one process


@pytest.fixture(scope="module")
def hostile_dataset(tmp_path_factory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("hostile-data"), per_class=20, size=64)
    build_corpus(root / "Positive")  # the oddities become crack images, the broken files must be skipped
    return root


@pytest.fixture(scope="module")
def runs(corpus, hostile_dataset, prefix, tiny_model_path, tmp_path_factory) -> tuple[dict[str, Run], Path]:
    out = tmp_path_factory.mktemp("hostile-out")
    model = str(tiny_model_path)
    files = [str(corpus / e.name) for e in ENTRIES]
    jobs = {
        # The folder as a user passes it, plus the folder named x.jpg by name (a folder walk enters it).
        "predict": ["predict", model, str(corpus), str(corpus / "x.jpg"), "--format", "json", "--backend", "torch"],
        "predict-good": ["predict", model, *[str(corpus / e.name) for e in GOOD], "--backend", "torch"],
        "predict-no-model": ["predict", "--model", str(out / "nope.safetensors"), str(corpus / "plain.jpg")],
        # No test split: the run's own test evaluation reads no files and only costs time here.
        "train": ["train", str(hostile_dataset), "--out", str(out / "runs"), "--name", "h", "--weights", weights_arg(),
                  "--input-size", "64", "--head-epochs", "1", "--finetune-epochs", "1", "--views", "1",
                  "--run-length", "5", "--test-fraction", "0", "--quiet"],
        "evaluate": ["evaluate", model, str(hostile_dataset), "--out", str(out / "eval"), "--quiet", "--backend", "torch"],
    }
    if has_module("crackscan.scan"):
        jobs["scan"] = ["scan", model, *files, "--out", str(out / "scan"), "--quiet"]
    if has_module("crackscan.explain"):
        jobs["explain"] = ["explain", model, *files, "--out", str(out / "explain")]
    return run_batch(prefix, jobs, out), out


def command(runs, name: str) -> Run:
    results, _ = runs
    if name not in results:
        pytest.skip(f"crackscan.{name} is not written yet")
    return results[name]


# ----------------------------------------------------------------------------------------------------
# predict


def test_predict_exit_code_and_no_traceback(runs, enforced):
    run = command(runs, "predict")
    assert_no_traceback(run)
    assert run.code == 1, run.err
    errors = [line for line in run.err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(expected_bad(enforced)), run.err
    assert len(json.loads(run.out)) == len(ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_predict_each_corpus_file(runs, corpus, entry, enforced):
    skip_if_readable(entry, enforced)
    run = command(runs, "predict")
    path = str(corpus / entry.name)
    rows = [r for r in json.loads(run.out) if r["file"] == path]
    assert len(rows) == 1, f"{path} appears {len(rows)} times in the output"
    row = rows[0]
    said = lines_naming(run.err, path)
    if entry.ok:
        assert row["error"] is None and 0.0 <= row["crack_probability"] <= 1.0, row
        assert row["label"] in ("Negative", "Positive")
        assert not said, said
    else:
        assert row["crack_probability"] is None and entry.reason in row["error"].lower(), row
        assert len(said) == 1 and entry.reason in said[0].lower(), said


def test_predict_all_good_exits_zero(runs, corpus):
    run = command(runs, "predict-good")
    assert_no_traceback(run)
    assert run.code == 0, run.err
    assert run.err.strip() == "", "a clean batch must print nothing on stderr"
    table = run.out.splitlines()[1:]
    files = [str(corpus / e.name) for e in GOOD]
    assert len(table) == len(GOOD)
    for line, path in zip(table, files):
        probability, label, name = line.split(None, 2)
        assert name == path and 0 <= float(probability) <= 1 and label in ("Negative", "Positive")


def test_predict_missing_model_is_one_line_exit_2(runs):
    run = command(runs, "predict-no-model")
    assert_no_traceback(run)
    assert run.code == 2 and len(run.err.strip().splitlines()) == 1, run.err


# ----------------------------------------------------------------------------------------------------
# train and evaluate: the corpus mixed into a labelled dataset


def test_train_completes_over_the_corpus(runs):
    run = command(runs, "train")
    run_dir = runs[1] / "runs" / "h"
    assert_no_traceback(run)
    assert run.code == 1, run.err  # done, but some files could not be read
    assert (run_dir / "model.safetensors").is_file()
    with open(run_dir / "history.csv", newline="") as handle:
        assert [r["phase"] for r in csv.DictReader(handle)] == ["head", "finetune"]


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_train_skips_exactly_the_broken_files(runs, entry, enforced):
    skip_if_readable(entry, enforced)
    command(runs, "train")
    run_dir = runs[1] / "runs" / "h"
    rel = f"Positive/{printable(entry.name)}"
    with open(run_dir / "skipped.csv", newline="", encoding="utf-8") as handle:
        skipped = {r["file"]: r["reason"] for r in csv.DictReader(handle)}
    with open(run_dir / "split.csv", newline="", encoding="utf-8") as handle:
        used = {r["file"] for r in csv.DictReader(handle)}
    said = lines_naming(runs[0]["train"].err, f"{rel}:")
    if entry.ok:
        assert rel in used and rel not in skipped and not said
    else:
        assert rel not in used
        assert rel in skipped and entry.reason in skipped[rel].lower(), skipped.get(rel)
        assert "\n" not in skipped[rel]
        assert len(said) == 1 and entry.reason in said[0].lower(), said


def test_evaluate_reports_and_scores_the_rest(runs, enforced):
    run = command(runs, "evaluate")
    assert_no_traceback(run)
    assert run.code == 1, run.err
    metrics = json.loads((runs[1] / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 40 + len(GOOD) + (0 if enforced else 1)


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_evaluate_each_corpus_file(runs, entry, enforced):
    skip_if_readable(entry, enforced)
    run = command(runs, "evaluate")
    said = lines_naming(run.err, f"Positive/{printable(entry.name)}:")
    if entry.ok:
        assert not said
    else:
        assert len(said) == 1 and entry.reason in said[0].lower(), run.err


# ----------------------------------------------------------------------------------------------------
# scan and explain


def test_scan_exit_code_and_no_traceback(runs):
    run = command(runs, "scan")
    assert_no_traceback(run)
    assert run.code == 1, run.err
    # As predict does: the count of failed files closes the report (one "error:" line each above).
    failed = sum(line.startswith("error: ") for line in run.err.splitlines())
    assert failed > 0 and f"{failed} file(s) failed (see above and summary.csv)" in run.err.splitlines(), run.err


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_scan_each_corpus_file(runs, corpus, entry, enforced):
    skip_if_readable(entry, enforced)
    run = command(runs, "scan")
    # The corpus's images are smaller than a patch: scan notes that on a line of its own, not as an error.
    said = [line for line in lines_naming(run.err, str(corpus / entry.name)) if not line.startswith("note: ")]
    if entry.ok:
        assert not said, said
        stem = Path(entry.name).stem
        assert any(stem in p.name for p in (runs[1] / "scan").rglob("*") if p.is_file()), f"no scan output for {entry.name}"
    else:
        assert len(said) == 1 and entry.reason in said[0].lower(), run.err


def test_explain_exit_code_and_no_traceback(runs):
    run = command(runs, "explain")
    assert_no_traceback(run)
    assert run.code == 1, run.err


@pytest.mark.parametrize("entry", ENTRIES, ids=ids(ENTRIES))
def test_explain_each_corpus_file(runs, corpus, entry, enforced):
    skip_if_readable(entry, enforced)
    run = command(runs, "explain")
    path = str(corpus / entry.name)
    said = lines_naming(run.err, path)
    if entry.ok:
        assert not said, said
        lines = [line for line in lines_naming(run.out, path) if "->" in line]
        assert len(lines) == 1, run.out
        overlay = Path(lines[0].rsplit("->", 1)[1].strip())
        with Image.open(overlay) as image:
            assert image.size[0] > 0
    else:
        assert len(said) == 1 and entry.reason in said[0].lower(), run.err


# ----------------------------------------------------------------------------------------------------
# The web service: every upload answered, never a 500


@pytest.fixture(scope="module")
def client(tiny_model_path):
    if not has_module("crackscan.serve"):
        pytest.skip("crackscan.serve is not written yet")
    from fastapi.testclient import TestClient

    from crackscan.serve import create_app

    # PyTorch backend: the service's handling of bad uploads must not depend on the ONNX export.
    app = create_app(str(tiny_model_path), backend="torch")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


UPLOADS = [e for e in ENTRIES if e.has_bytes]


@pytest.mark.parametrize("route, field", [("/predict", "file"), ("/scan", "photo")])
@pytest.mark.parametrize("entry", UPLOADS, ids=ids(UPLOADS))
def test_service_answers_every_upload(client, corpus, entry, route, field):
    data = (corpus / entry.name).read_bytes()
    name = printable(entry.name)  # an HTTP client sends text: a non-UTF-8 name cannot travel as it is
    response = client.post(route, files={field: (name, data, "application/octet-stream")})
    if entry.ok:
        assert response.status_code == 200, response.text
        if route == "/predict":
            assert 0.0 <= response.json()["crack_probability"] <= 1.0
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail, detail
        assert name in detail and entry.reason in detail.lower(), detail


# ----------------------------------------------------------------------------------------------------
# Special files and folders, one at a time


def test_a_folder_that_cannot_be_searched_is_reported_and_the_rest_predicted(tmp_path, prefix):
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(folder / "ok.jpg")
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(folder / "locked" / "hidden.jpg")
    (folder / "locked").chmod(0)
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                                str(folder / "locked")], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("mode 000 does not stop this process from searching (root without setpriv): nothing to test")
        runs = run_batch(prefix, {"p": ["predict", str(folder), "--format", "json"]}, tmp_path)
    finally:
        (folder / "locked").chmod(0o755)
    run = runs["p"]
    assert_no_traceback(run)
    assert run.code == 1, run.err
    assert [r["file"] for r in json.loads(run.out)] == [str(folder / "ok.jpg"), str(folder / "locked")]
    assert f"error: {folder / 'locked'}: folder cannot be searched (permission denied)" in run.err.splitlines()


def test_pipes_and_devices_are_refused_without_reading_them(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    for path, words in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file")):
        with pytest.raises(ImageError, match=words):
            load_patch(path, 32)


def test_sixteen_bit_images_are_scaled_band_by_band_as_a_whole(tmp_path):
    from crackscan.images import _BAND_ROWS

    # Taller than several bands, with values that round differently in every band.
    rows = 3 * _BAND_ROWS + 17
    values = np.random.default_rng(0).integers(0, 65536, (rows, 40), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    expected = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    assert pixels.shape == (rows, 40, 3)
    np.testing.assert_array_equal(pixels[..., 0].astype(int), expected.astype(int))


def test_a_sixteen_bit_image_costs_no_float_copies_of_itself():
    # A 200-KB PNG can hold 100 million 16-bit pixels: float64 copies of the whole image took gigabytes.
    import io
    import tracemalloc

    values = np.zeros((2000, 2000), dtype=np.uint16)
    values[::7] = 40000
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    tracemalloc.start()
    try:
        load_image(buffer.getvalue())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The pixels as numpy sees them (8 MB), the 8-bit result (4 MB) and bands: well under one float64 copy (32 MB).
    assert peak < 3 * values.nbytes, f"{peak / 1e6:.0f} MB"


def test_floating_point_tiff_scaled_to_one_is_not_read_as_black(tmp_path):
    ramp = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    pixels = np.asarray(load_image(tmp_path / "unit.tif"))
    assert pixels.min() == 0 and pixels.max() == 255
    Image.fromarray(ramp * 255, mode="F").save(tmp_path / "bytes.tif")
    np.testing.assert_allclose(np.asarray(load_image(tmp_path / "bytes.tif")).astype(int), pixels.astype(int), atol=1)


def test_predict_writes_an_existing_file_in_a_folder_it_may_not_write_to(tmp_path, prefix):
    # The report is written in place: the file's own permission counts, not its folder's (e.g. /dev/stdout).
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "ok.jpg")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "r.csv").write_text("")
    (tmp_path / "ro" / "r.csv").chmod(0o666)
    (tmp_path / "ro").chmod(0o555)
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", "import os, sys; sys.exit(os.access(sys.argv[1], os.W_OK))",
                                str(tmp_path / "ro")], capture_output=True)
        if probe.returncode == 1:
            pytest.skip("this process may write into a mode-555 folder (root without setpriv): nothing to test")
        run = run_batch(prefix, {"p": ["predict", str(tmp_path / "ok.jpg"), "--format", "csv", "-o",
                                       str(tmp_path / "ro" / "r.csv")]}, tmp_path)["p"]
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert run.code == 0, run.err
    assert (tmp_path / "ro" / "r.csv").read_text().startswith("file,crack_probability,label,error")
