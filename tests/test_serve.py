"""The web service: every endpoint, every bad request, the size limit and the concurrency bound.

API tests use ``TestClient`` (which raises on any server exception, so a hostile upload that reached the
last-resort 500 handler fails the test). The size limit and the 503 bound are also checked on a real
uvicorn server with hand-written HTTP, because only a real connection can send headers first, hold a
half-sent body, or stream past the limit.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import concrete_patch, concrete_photo
from corpus import jpeg_bomb, png_bomb
from crackscan.model import ModelError, load_model
from crackscan.scan import scan_photo
from crackscan.serve import create_app, safe_filename, serve
from live_server import live_server, raw_request, read_response

SMALL_LIMIT = 100_000


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def patch_bytes() -> bytes:
    return jpeg(concrete_patch(np.random.default_rng(1), 64, True))


@pytest.fixture(scope="module")
def photo_bytes() -> bytes:
    return jpeg(concrete_photo(np.random.default_rng(2), 640, 480))


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def app(tiny_model_path):
    return create_app(str(tiny_model_path))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def small_client(tiny_model_path):
    with TestClient(create_app(str(tiny_model_path), max_upload_bytes=SMALL_LIMIT)) as c:
        yield c


def decode_data_url(url: str, media_type: str) -> Image.Image:
    prefix = f"data:{media_type};base64,"
    assert url.startswith(prefix), url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    image.load()
    return image


# ----------------------------------------------------------------------------------------- endpoints


def test_predict_gives_the_models_probability(client, model, patch_bytes):
    response = client.post("/predict", files={"file": ("wall.jpg", patch_bytes, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = model.predict([patch_bytes], backend="torch")[0]
    assert body["file"] == "wall.jpg"
    assert body["crack_probability"] == pytest.approx(expected.probability, abs=1e-5)
    assert body["label"] == expected.label and body["label"] in model.classes
    assert body["is_crack"] == (body["label"] == model.crack_class)
    assert body["threshold"] == model.threshold
    assert body["model"] == "tiny.safetensors"


def test_scan_returns_summary_images_and_map(client, model, photo_bytes):
    response = client.post("/scan", files={"photo": ("floor.jpg", photo_bytes, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    reference = scan_photo(model, photo_bytes)
    assert body["file"] == "floor.jpg" and body["model"] == "tiny.safetensors"
    assert body["photo_size"] == [640, 480]
    assert body["patch_size"] == 227 and body["threshold"] == model.threshold
    rows, cols = body["map_shape"]
    assert (rows, cols) == reference.probability.shape
    # The map PNG holds the library's probabilities, one pixel per cell, 255 = 1.0.
    grey = decode_data_url(body["map"], "image/png")
    assert grey.mode == "L" and grey.size == (cols, rows)
    assert np.abs(np.asarray(grey) / 255.0 - reference.probability).max() <= 0.5 / 255 + 1e-6
    assert np.abs(np.asarray(body["probability"]) - reference.probability).max() < 1e-6
    assert body["is_crack"] == reference.verdict and body["verdict"] == reference.label
    assert body["regions"] == reference.regions
    # The cell edges tile the photo, so the page can draw the map over it.
    assert len(body["cell_edges"]["x"]) == cols + 1 and len(body["cell_edges"]["y"]) == rows + 1
    assert body["cell_edges"]["x"][0] == 0 and body["cell_edges"]["x"][-1] == 640
    assert body["cell_edges"]["y"][-1] == 480
    overlay = decode_data_url(body["overlay"], "image/jpeg")
    photo = decode_data_url(body["photo"], "image/jpeg")
    assert overlay.height > photo.height  # the legend band under the photo
    assert abs(photo.width / photo.height - 640 / 480) < 0.02


def test_scan_threshold_and_patch_size_fields(client, photo_bytes):
    def scan(**fields):
        response = client.post("/scan", files={"photo": ("p.jpg", photo_bytes, "image/jpeg")},
                               data={k: str(v) for k, v in fields.items()})
        assert response.status_code == 200, response.text
        return response.json()

    everything = scan(threshold=0.0)
    assert everything["threshold"] == 0.0 and everything["is_crack"]
    assert everything["flagged_fraction"] == pytest.approx(1.0)
    nothing = scan(threshold=1.0)
    assert not nothing["is_crack"] and nothing["regions"] == [] and nothing["verdict"] == "no crack"
    finer = scan(patch_size=113)
    assert finer["patch_size"] == 113
    assert finer["map_shape"][0] * finer["map_shape"][1] > everything["map_shape"][0] * everything["map_shape"][1]


@pytest.mark.parametrize("fields, word", [
    ({"patch_size": "5"}, "patch_size"),
    ({"patch_size": "huge"}, "patch_size"),
    ({"threshold": "1.5"}, "threshold"),
    ({"threshold": "-0.1"}, "threshold"),
    ({"threshold": "nan?"}, "threshold"),
])
def test_scan_refuses_bad_fields(client, photo_bytes, fields, word):
    response = client.post("/scan", files={"photo": ("p.jpg", photo_bytes, "image/jpeg")}, data=fields)
    assert response.status_code == 422
    assert word in response.json()["detail"]


def test_model_and_health(client, model):
    meta = client.get("/model").json()
    assert meta["file"] == "tiny.safetensors"
    assert meta["classes"] == model.classes and meta["input_size"] == 64
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny.safetensors"
    assert health["workers"] == 2 and health["capacity"] == 18
    assert health["max_upload_bytes"] == 30 * 1024 * 1024
    assert health["admitted"] == 0 and health["running"] == 0


def test_page_and_its_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "does not replace a professional structural assessment" in page.text
    assert 'name="viewport"' in page.text and 'type="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    # Nothing outside the static folder is served.
    for path in ("/static/../serve.py", "/static/%2e%2e/serve.py", "/static/..%2fserve.py", "/static/"):
        assert client.get(path).status_code == 404, path


def test_openapi_documents_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/scan", "/model", "/health"} <= set(spec["paths"])
    assert "/" not in spec["paths"]
    assert "415" in spec["paths"]["/predict"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


def test_model_is_loaded_in_the_lifespan(tmp_path):
    app = create_app(str(tmp_path / "missing.safetensors"))  # nothing is read yet
    with pytest.raises(ModelError, match="no such model file"):
        with TestClient(app):
            pass


def test_serve_names_a_missing_model_before_starting(tmp_path):
    with pytest.raises(ModelError, match="missing.safetensors: no such model file"):
        serve(str(tmp_path / "missing.safetensors"), port=1)


def test_serve_refuses_what_it_cannot_run_in_one_line_before_loading(tiny_model_path, tmp_path, capsys):
    import socket

    from crackscan.cli import main

    (tmp_path / "m.onnx").write_bytes(b"not even onnx")
    assert main(["serve", "--model", str(tmp_path / "m.onnx")]) == 2
    assert "the service scans photos, which needs the PyTorch model" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_model_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in err and len(err.splitlines()) == 1
    for bad in (["--port", "99999"], ["--max-upload-mb", "nan"], ["--max-upload-mb", "inf"], ["--max-upload-mb", "-1"],
                ["--max-upload-mb", "0.0000001"]):  # under one byte: it reached create_app's internal check
        with pytest.raises(SystemExit) as exited:
            main(["serve", *bad])
        assert exited.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_the_listen_check_binds_as_the_server_does():
    import asyncio
    import socket

    from crackscan.serve import _check_listen

    # An address that is not this machine's ends the server: said before, not skipped.
    with pytest.raises(OSError, match="cannot listen on 192.0.2.1:8765"):
        _check_listen("192.0.2.1", 8765)  # TEST-NET-1: never a local address
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    with socket.socket() as taken:  # an IPv4-only listener does not stop an IPv6-only server on the same port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _check_listen("::", port)

        async def serve_once() -> None:
            server = await asyncio.start_server(lambda r, w: None, host="::", port=port)
            server.close()

        asyncio.run(serve_once())  # and the server itself agrees


# ------------------------------------------------------------------------------------- bad requests


def truncated_jpeg() -> bytes:
    whole = jpeg(concrete_patch(np.random.default_rng(3), 96, False))
    return whole[: len(whole) // 2]


BAD_UPLOADS = [
    # name, bytes, declared type, expected status, words the message must contain
    ("notes.jpg", b"Inspection notes: wall B.\n" * 40, "image/jpeg", 415, "not an image"),
    ("notes.txt", b"just text", "text/plain", 415, "not an image"),
    ("empty.jpg", b"", "image/jpeg", 400, "empty"),
    ("cut.jpg", truncated_jpeg(), "image/jpeg", 400, "truncated"),
    ("bomb.png", png_bomb(), "image/png", 413, "too large"),
    ("bomb.jpg", jpeg_bomb(), "image/jpeg", 413, "too large"),
]


@pytest.mark.parametrize("endpoint, field", [("/predict", "file"), ("/scan", "photo")])
@pytest.mark.parametrize("name, data, kind, status, words", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_a_clear_4xx(app, client, endpoint, field, name, data, kind, status, words):
    response = client.post(endpoint, files={field: (name, data, kind)})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in detail and detail.startswith(name + ":"), detail
    assert "\n" not in detail and "Traceback" not in detail
    assert app.state.internal_errors == 0


@pytest.mark.parametrize("endpoint", ["/predict", "/scan"])
def test_requests_without_a_file(client, endpoint, patch_bytes):
    cases = [
        {},  # no body at all
        {"files": {"wrong_field": ("a.jpg", patch_bytes, "image/jpeg")}},
        {"data": {"file": "not a file", "photo": "not a file"}},
        {"content": json.dumps({"file": "/etc/passwd"}), "headers": {"content-type": "application/json"}},
        {"content": b"--x\r\nnot really multipart", "headers": {"content-type": "multipart/form-data; boundary=x"}},
    ]
    for kwargs in cases:
        response = client.post(endpoint, **kwargs)
        assert response.status_code in (400, 422), (kwargs, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail, response.text
    missing = client.post(endpoint, files={"wrong_field": ("a.jpg", patch_bytes, "image/jpeg")})
    assert "Field required" in missing.json()["detail"] and "multipart" in missing.json()["detail"]


def test_wrong_methods_and_paths(client):
    assert client.get("/predict").status_code == 405
    assert client.put("/scan").status_code == 405
    assert client.delete("/model").status_code == 405
    assert client.post("/health").status_code == 405
    assert client.get("/etc/passwd").status_code == 404
    assert client.post("/predict/../../etc/passwd").status_code == 404


def test_a_filename_is_never_read(client, tmp_path, patch_bytes, model):
    """The filename is only echoed: a path to a real image on disk does not replace the uploaded bytes."""
    on_disk = tmp_path / "real.jpg"
    on_disk.write_bytes(jpeg(concrete_patch(np.random.default_rng(9), 64, False)))
    for filename in (str(on_disk), "../../etc/passwd", f"file://{on_disk}"):
        # Text uploaded under the name of a real image: if the server read the path, this would pass.
        response = client.post("/predict", files={"file": (filename, b"plain text, not an image", "image/jpeg")})
        assert response.status_code == 415, response.text
        assert str(tmp_path) not in response.text
    response = client.post("/predict", files={"file": (str(on_disk), patch_bytes, "image/jpeg")})
    assert response.status_code == 200
    body = response.json()
    assert body["file"] == "real.jpg"
    assert body["crack_probability"] == pytest.approx(model.predict([patch_bytes], backend="torch")[0].probability,
                                                      abs=1e-5)
    passwd = client.post("/predict", files={"file": ("../../etc/passwd", patch_bytes, "image/jpeg")}).json()
    assert passwd["file"] == "passwd"


@pytest.mark.parametrize("raw, clean", [
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
    ("a\nb\r\x00c.jpg", "abc.jpg"),
    ("..", "upload"),
    ("", "upload"),
    (None, "upload"),
    (".hidden.jpg", "hidden.jpg"),
    ("x" * 500 + ".jpg", "x" * 200),
    ("fissure béton 写真.jpg", "fissure béton 写真.jpg"),
])
def test_safe_filename(raw, clean):
    assert safe_filename(raw) == clean


def test_odd_filenames_are_echoed_sanitised(client, patch_bytes):
    for name in ("a\tb.jpg", "über crack (2).JPG", "x" * 1000 + ".jpg", "%00.jpg", '"quoted".jpg'):
        response = client.post("/predict", files={"file": (name, patch_bytes, "image/jpeg")})
        assert response.status_code == 200, (name, response.text)
        echoed = response.json()["file"]
        assert "/" not in echoed and "\t" not in echoed and len(echoed) <= 200


# --------------------------------------------------------------------------------------- size limit


def test_oversize_with_honest_content_length(small_client, app):
    response = small_client.post("/predict", files={"file": ("big.jpg", b"\xff" * (SMALL_LIMIT + 1), "image/jpeg")})
    assert response.status_code == 413
    assert "upload too large" in response.json()["detail"] and "limit is 0.1 MB" in response.json()["detail"]


def test_oversize_without_content_length_is_counted(small_client):
    def chunks():  # a generator body is sent chunked: no Content-Length to check
        for _ in range(4):
            yield b"\0" * (SMALL_LIMIT // 2)

    response = small_client.post("/predict", content=chunks(),
                                 headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert "upload too large" in response.json()["detail"]


def test_oversize_with_a_lying_content_length(small_client):
    body = b"\0" * (SMALL_LIMIT * 3)
    response = small_client.post("/scan", content=body, headers={
        "content-type": "multipart/form-data; boundary=xyz", "content-length": "100"})
    assert response.request.headers["content-length"] == "100"  # the lie really was sent
    assert response.status_code == 413, response.text


def test_default_limit_is_30_megabytes(client, patch_bytes):
    padding = 30 * 1024 * 1024 - len(patch_bytes) - 1000
    # A JPEG with bytes after its end marker still decodes: just under the limit is accepted...
    fits = client.post("/predict", files={"file": ("a.jpg", patch_bytes + b"\0" * padding, "image/jpeg")})
    assert fits.status_code == 200, fits.text
    over = client.post("/predict", files={"file": ("a.jpg", patch_bytes + b"\0" * (padding + 2000), "image/jpeg")})
    assert over.status_code == 413


def test_an_unexpected_error_becomes_a_generic_500(tiny_model_path):
    app = create_app(str(tiny_model_path))

    def broken() -> None:
        raise RuntimeError("secret internals /home/somebody")

    app.add_api_route("/broken", broken)  # a route that fails the way a bug would
    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/broken")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; the server log has the details"}
    assert app.state.internal_errors == 1


# ------------------------------------------------------------------------------ on a real HTTP server


def multipart(field: str, filename: str, data: bytes, boundary: str = "crackscanboundary") -> tuple[str, bytes]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def head(path: str, content_type: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n").encode()


def wait_for(url: str, key: str, value: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/health").json()[key] != value:
        assert time.monotonic() < deadline, f"/health never showed {key} = {value}"
        time.sleep(0.02)


def test_full_queue_answers_503_then_recovers(tiny_model_path, patch_bytes):
    """max_concurrency=1, max_queue=0: a request held mid-upload fills the only slot, deterministically."""
    app = create_app(str(tiny_model_path), max_concurrency=1, max_queue=0)
    kind, body = multipart("file", "held.jpg", patch_bytes)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        held = raw_request(port, head("/predict", kind, len(body)), body[: len(body) // 2])
        try:
            wait_for(url, "admitted", 1)
            refused = httpx.post(url + "/predict", files={"file": ("b.jpg", patch_bytes, "image/jpeg")})
            assert refused.status_code == 503, refused.text
            assert "busy" in refused.json()["detail"]
            assert int(refused.headers["retry-after"]) >= 1
            # Cheap endpoints are not queued behind the work.
            assert httpx.get(url + "/health").json()["admitted"] == 1
            assert httpx.get(url + "/model").status_code == 200
            held.sendall(body[len(body) // 2:])
            status, _, answer = read_response(held)
            assert status == 200, answer
            assert json.loads(answer)["file"] == "held.jpg"
        finally:
            held.close()
        wait_for(url, "admitted", 0)
        again = httpx.post(url + "/predict", files={"file": ("c.jpg", patch_bytes, "image/jpeg")})
        assert again.status_code == 200


def test_client_that_disconnects_mid_upload_frees_its_slot(tiny_model_path, patch_bytes):
    app = create_app(str(tiny_model_path), max_concurrency=1, max_queue=0)
    kind, body = multipart("file", "gone.jpg", patch_bytes)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        gone = raw_request(port, head("/predict", kind, len(body)), body[:100])
        wait_for(url, "admitted", 1)
        gone.close()
        wait_for(url, "admitted", 0)
        assert httpx.post(url + "/predict", files={"file": ("a.jpg", patch_bytes, "image/jpeg")}).status_code == 200
        assert app.state.internal_errors == 0


def test_real_server_refuses_oversize_before_and_while_reading(tiny_model_path):
    app = create_app(str(tiny_model_path), max_upload_bytes=SMALL_LIMIT)
    kind = "multipart/form-data; boundary=x"
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        # Content-Length over the limit: answered from the headers alone, no body byte sent.
        conn = raw_request(port, head("/scan", kind, 10 * SMALL_LIMIT))
        status, _, answer = read_response(conn)
        conn.close()
        assert status == 413 and b"upload too large" in answer
        # Chunked, no Content-Length: a valid multipart start, then a file that never ends; answered as
        # soon as the count passes the limit.
        _, start = multipart("file", "endless.jpg", b"")
        start = start[: start.index(b"\r\n\r\n") + 4]
        conn = raw_request(port, head("/predict", kind.replace("=x", "=crackscanboundary"), None),
                           f"{len(start):x}\r\n".encode() + start + b"\r\n")
        chunk = b"\0" * 16384
        sent = len(start)
        try:
            while sent <= 2 * SMALL_LIMIT:
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: read what it said
        status, _, answer = read_response(conn)
        conn.close()
        assert status == 413 and b"upload too large" in answer
        assert app.state.internal_errors == 0
        assert httpx.get(url + "/health").json()["admitted"] == 0


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
def test_a_stalled_or_trickled_upload_is_answered_408_and_frees_its_slot(tiny_model_path, patch_bytes, trickle):
    # Trickled: one byte every 0.3 s never pauses for read_timeout; 18 such uploads held every admission slot.
    import select

    app = create_app(str(tiny_model_path), max_concurrency=1, max_queue=0, read_timeout=1.0)
    kind, body = multipart("file", "slow.jpg", patch_bytes)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = raw_request(port, head("/predict", kind, len(body)), body[:200])
        started = time.monotonic()
        for byte in body[200:250] if trickle else ():  # stalled: nothing more is sent
            if select.select([slow], [], [], 0.3)[0]:
                break  # answered
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
        status, _, answer = read_response(slow)
        slow.close()
        assert status == 408 and (b"upload too slow" if trickle else b"upload stalled: nothing received") in answer
        assert time.monotonic() - started < 5, "cut off only when the trickle ended"
        wait_for(url, "admitted", 0)
        assert httpx.post(url + "/predict", files={"file": ("a.jpg", patch_bytes, "image/jpeg")}).status_code == 200
        assert app.state.internal_errors == 0


def test_scan_refuses_a_patch_size_that_costs_too_much_work(tiny_model_path, photo_bytes):
    # 640 x 480 at patch size 32 with the tiny model's 64-px input: 1280 x 960 pixels through the network.
    with TestClient(create_app(str(tiny_model_path), max_scan_pixels=1_000_000)) as client:
        files = {"photo": ("p.jpg", photo_bytes, "image/jpeg")}
        refused = client.post("/scan", files=files, data={"patch_size": "32"})
        assert refused.status_code == 422
        assert "1280x960 pixels (at most 1 million); use a larger patch size" in refused.json()["detail"]
        assert client.post("/scan", files=files, data={"patch_size": "64"}).status_code == 200
    # At the default patch size or above, the service scans what the CLI scans: a large photo is not refused.
    with TestClient(create_app(str(tiny_model_path), max_scan_pixels=1_000)) as client:
        assert client.post("/scan", files=files, data={"patch_size": "227"}).status_code == 200
        assert client.post("/scan", files=files, data={"patch_size": "226"}).status_code == 422


def test_model_metadata_shows_no_server_paths_and_heads_answer(tiny_model_path, tmp_path):
    from crackscan.model import load_model

    model = load_model(tiny_model_path)
    model.meta["training"] = {"data": "/srv/secret/site-photos", "out": "/srv/secret/runs", "weights": "imagenet",
                              "epochs": 3}
    model.meta["pretrained"] = "file /srv/secret/weights/base.safetensors"  # as training writes it
    path = model.save(tmp_path / "m.safetensors")
    with TestClient(create_app(str(path))) as client:
        meta = client.get("/model").json()
        assert meta["training"] == {"data": "site-photos", "out": "runs", "weights": "imagenet", "epochs": 3}
        assert meta["pretrained"] == "file base.safetensors" and "/srv" not in json.dumps(meta)
        for url in ("/", "/health", "/model"):
            assert client.head(url).status_code == 200, url
        # The page under its static name carries the page's headers too (no framing, no sniffing).
        copy = client.get("/static/index.html")
        assert copy.status_code == 200 and "frame-ancestors 'none'" in copy.headers["content-security-policy"]
        assert copy.headers["x-content-type-options"] == "nosniff"
