"""`crackscan predict` and the Python API on files, folders and globs."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

import crackscan
from crackscan.cli import main


@pytest.fixture()
def images(tmp_path, tiny_dataset):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((tiny_dataset / "Positive").glob("*.jpg"))[:3] + sorted((tiny_dataset / "Negative").glob("*.jpg"))[:3]:
        (folder / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    return folder


def test_python_api_predicts(tiny_model_path, images):
    model = crackscan.load_model(tiny_model_path)
    files = sorted(images.glob("*.jpg"))
    preds = model.predict(files, backend="torch")
    assert [p.source for p in preds] == [str(f) for f in files]
    assert all(0 <= p.probability <= 1 and p.label in model.classes for p in preds)
    # Same result whatever the batch size: batching must not mix images up.
    again = model.predict(files, batch_size=2, backend="torch")
    assert np.allclose([p.probability for p in preds], [p.probability for p in again], atol=1e-5)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_cli_formats_and_bad_file_exit_code(tiny_model_path, images, capsys, fmt):
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    code = main(["predict", str(tiny_model_path), str(images), "--format", fmt, "--backend", "torch"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in err and "Traceback" not in err
    rows = json.loads(out) if fmt == "json" else list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 7
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and all(0 <= float(r["crack_probability"]) <= 1 for r in good)


def test_cli_table_glob_and_threshold(tiny_model_path, images, capsys):
    code = main(["predict", "--model", str(tiny_model_path), str(images / "Positive-*.jpg"), "--threshold", "0",
                 "--backend", "torch"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines()[1:] if line.strip()]
    assert len(lines) == 3 and all("Positive" in line.split()[1] for line in lines)  # threshold 0: all crack


@pytest.mark.parametrize("command", ["predict", "scan", "explain"])
def test_cli_says_when_there_is_nothing_to_read(tiny_model_path, tmp_path, capsys, command):
    # A folder holding no image crackscan reads (phones' .HEIC, say) is "nothing done", not a silent success.
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "IMG_0001.HEIC").write_bytes(b"\0" * 64)
    out = ["--out", str(tmp_path / "out")] if command != "predict" else []
    assert main([command, str(tiny_model_path), str(folder), *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no image files in {folder}" in err and ".jpg" in err


@pytest.mark.parametrize("command", ["scan", "explain"])
def test_cli_refuses_an_output_folder_that_is_a_file(tiny_model_path, images, tmp_path, capsys, command):
    (tmp_path / "taken").write_text("not a folder")
    assert main([command, str(tiny_model_path), str(images), "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == f"crackscan: error: --out {tmp_path / 'taken'} is a file, not a folder\n"
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_output_file_that_cannot_be_written_is_refused_before_the_batch(tiny_model_path, images, tmp_path, capsys):
    for target, why in ((tmp_path / "no-such-folder" / "r.csv", "no such folder"), (tmp_path, "a folder")):
        code = main(["predict", str(tiny_model_path), str(images), "--format", "csv", "-o", str(target)])
        captured = capsys.readouterr()
        assert code == 2 and f"cannot write a file there ({why})" in captured.err, captured.err
        assert captured.out == ""  # nothing predicted first


def test_predict_points_a_whole_photo_to_scan(tiny_model_path, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    photo, patch = tmp_path / "photo.png", tmp_path / "patch.jpg"
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(photo)  # large file: its size is read
    Image.fromarray(rng.integers(0, 256, (227, 227, 3), dtype=np.uint8)).save(patch)
    assert main(["predict", str(tiny_model_path), str(photo), str(patch)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: {photo} is 800x600 px: predict squeezes it into one 64-px patch; for a photo use "
                   "`crackscan scan`"]


def test_a_glob_matching_folders_searches_them_as_folders_named_are(tmp_path):
    from PIL import Image

    from crackscan.predict import expand_paths

    for folder in ("site-a", "site-b/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "p.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    found = list(expand_paths([str(tmp_path / "*")]))
    assert found == [tmp_path / "notes.txt", tmp_path / "site-a" / "p.jpg", tmp_path / "site-b" / "deeper" / "p.jpg"]
    assert list(expand_paths([str(tmp_path / "site-*")])) == found[1:]
    # "**" matches the folders and the files in them: each file still comes once, also through a link to a folder.
    (tmp_path / "link-to-a").symlink_to(tmp_path / "site-a", target_is_directory=True)
    assert list(expand_paths([str(tmp_path / "**")])) == [tmp_path / "site-a" / "p.jpg",
                                                          tmp_path / "site-b" / "deeper" / "p.jpg", found[0]]



def test_python_api_takes_one_stream_or_bytes_like_as_one_image(tiny_model_path, images):
    model = crackscan.load_model(tiny_model_path)
    path = sorted(images.glob("*.jpg"))[0]
    data = path.read_bytes()
    expected = model.predict(path)[0].probability
    with open(path, "rb") as stream:
        sources = [stream, io.BytesIO(data), bytearray(data), memoryview(data), data]
        for source in sources:
            (prediction,) = model.predict(source)  # one image, not one per line or per byte
            assert prediction.error is None and prediction.probability == pytest.approx(expected, abs=1e-6)
    # An array of file names (a DataFrame column's values) is a list of images, as any iterable is.
    names = np.array([str(p) for p in sorted(images.glob("*.jpg"))[:2]])
    assert [p.source for p in model.predict(names)] == names.tolist()


def test_python_api_refuses_what_it_would_misread(tiny_model_path, images):
    from PIL import Image

    from crackscan.explain import explain_image
    from crackscan.images import load_patch
    from crackscan.scan import scan_scaled

    model = crackscan.load_model(tiny_model_path)
    path = sorted(images.glob("*.jpg"))[0]
    with Image.open(path) as image:
        for decoded in (np.asarray(image), image):  # pixels go to crack_probability, which says so
            with pytest.raises(TypeError, match="crack_probability"):
                model.predict(decoded)
    patch = load_patch(path, model.input_size)[None]
    for backend in ("torch", "onnx"):
        # A float patch in [0, 1] became black and uint16 wrapped on one backend; each answered something.
        for bad in (patch / 255.0, patch.astype(np.uint16) * 256):
            with pytest.raises(TypeError, match="uint8"):
                model.crack_probability(bad, backend=backend)
        with pytest.raises(ValueError, match="input size"):
            model.crack_probability(load_patch(path, model.input_size + 8)[None], backend=backend)
    with pytest.raises(TypeError, match="uint8"):
        scan_scaled(model, np.asarray(Image.open(path)) / 255.0, (64, 64))
    for threshold in (2.0, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            model.predict(path, threshold=threshold)
        with pytest.raises(ValueError, match="threshold"):
            explain_image(model, path, images / "x.png", threshold=threshold)
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(path, batch_size=0)  # every image was dropped without a word
    with pytest.raises(TypeError, match="path, bytes or a binary stream"):
        crackscan.images.read_source(42, "42")
