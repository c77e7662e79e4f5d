"""The web service: a JSON API for patches and photos, and a page for people.

``create_app`` builds a FastAPI application; ``serve`` runs it with uvicorn (``crackscan serve``).

* ``POST /predict``: one image (a patch) -> its crack probability and label.
* ``POST /scan``: one photo -> the scan summary, the probability map (as numbers and as a PNG), the
  overlay and the photo; the page re-thresholds the map in the browser without uploading again.
* ``GET /model``, ``GET /health``; OpenAPI at ``/docs``; the page at ``/``.

Load. The model is loaded once, in the lifespan. Decoding and inference run on worker threads,
``max_concurrency`` at a time. A request for the work endpoints is *admitted* before its body is read;
at most ``max_concurrency + max_queue`` are admitted at once and the next one is answered 503 with a
``Retry-After`` header straight away, so an overload never piles up bodies or threads.

Slow clients. A client that pauses for ``read_timeout`` seconds while sending its body is answered
408, which frees its admission slot; so is one that trickles its body, slower on average than
``MIN_UPLOAD_RATE`` beyond a first ``read_timeout`` seconds of grace.

Costly requests. A /scan with a patch size below the default runs the network over at most
``max_scan_pixels`` pixels of the scaled photo; a patch size that would need more is answered 422.

Hostile input. Uploads are bytes in memory: no client value is ever used as a path (the filename is
only echoed, sanitised). The body limit is checked on ``Content-Length`` before anything is read *and*
counted while reading (a chunked or lying client gets 413 as soon as it passes the limit). Undecodable
data answers 415 (not an image at all) or 400 (an image that is damaged, truncated or empty), and a
header claiming too many pixels answers 413, all with a one-line ``detail``. A last-resort handler turns
anything unexpected into a logged 500 with a generic message; the tests check that no hostile upload
reaches it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import time
import unicodedata
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crackscan.images import ImageError, load_patch
from crackscan.model import CrackModel, ModelError, default_model_path, load_model, read_meta
from crackscan.scan import PATCH_SIZE

logger = logging.getLogger("crackscan.serve")

DISCLAIMER = "crackscan is a decision aid; it does not replace a professional structural assessment."
#: Endpoints that do CPU work: admitted (or refused with 503) before their body is read.
WORK_PATHS = frozenset({"/predict", "/scan"})
#: Longest side of the overlay and photo images sent back by /scan: enough for a screen, small to send.
IMAGE_SIDE = 1280
STATIC = Path(str(resources.files("crackscan") / "static"))
# The page loads its script and style from this server only and shows images from data: URLs.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

T = TypeVar("T")


# ------------------------------------------------------------------------------------------- admission


class UploadTooLarge(HTTPException):
    """The request body passed the size limit (raised while reading, so FastAPI passes it through)."""

    def __init__(self, limit: int):
        super().__init__(413, f"upload too large: the limit is {_megabytes(limit)}")


@dataclass
class WorkGate:
    """Admission and worker slots for the CPU endpoints.

    ``admitted`` counts requests between admission and their answer (reading the body, waiting for a
    worker, or running); ``running`` counts those on a worker. All counters change on the event loop's
    thread only, so they need no lock.
    """

    workers: int
    waiting: int
    admitted: int = 0
    running: int = 0
    refused: int = 0
    seconds_per_job: float = 0.5  # running average, for Retry-After
    _slots: anyio.Semaphore | None = field(default=None, repr=False)

    @property
    def capacity(self) -> int:
        return self.workers + self.waiting

    def open(self) -> None:
        """Create the worker semaphore inside the running event loop (each lifespan has its own)."""
        self._slots = anyio.Semaphore(self.workers)

    def try_admit(self) -> bool:
        if self.admitted >= self.capacity:
            self.refused += 1
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead divided among the workers."""
        return max(1, min(60, math.ceil(self.seconds_per_job * self.admitted / self.workers)))

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on a worker thread once one of the ``workers`` slots is free."""
        assert self._slots is not None, "the app's lifespan has not started"
        async with self._slots:
            self.running += 1
            started = time.perf_counter()
            try:
                return await anyio.to_thread.run_sync(function, *args)
            finally:
                self.running -= 1
                self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.perf_counter() - started)


class UploadStalled(HTTPException):
    """The client stopped sending its body: it must not hold an admission slot for ever."""

    def __init__(self, seconds: float):
        super().__init__(408, f"upload stalled: nothing received for {seconds:g} s")


class UploadTooSlow(HTTPException):
    """The client sends its body, but so slowly that it would hold an admission slot for hours."""

    def __init__(self, received: int, seconds: float):
        super().__init__(408, f"upload too slow: {received / 1024:.0f} KB in {seconds:.0f} s, under the "
                              f"{MIN_UPLOAD_RATE // 1024} KB/s the service asks for on average")


#: Bytes a second an upload must average, beyond a first ``read_timeout`` seconds of grace: a GPRS-slow phone
#: link passes (a 4-MB photo at 20 KB/s is well within it), a trickle of a byte every few seconds does not.
#: It makes holding every slot cost a steady stream per slot; it cannot make it impossible.
MIN_UPLOAD_RATE = 4 * 1024


class UploadGuard:
    """ASGI middleware: the body size limit and read timeout for every request, admission for the work endpoints."""

    def __init__(self, app: ASGIApp, *, gate: WorkGate, max_body: int, read_timeout: float):
        self.app = app
        self.gate = gate
        self.max_body = max_body
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await _answer(scope, receive, send, 413, f"upload too large: {_megabytes(declared)} sent, "
                                                     f"the limit is {_megabytes(self.max_body)}")
            return
        received = 0
        body_done = False
        started = time.monotonic()

        async def counted_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls wait for a disconnect, for as long as the response takes
                return await receive()
            # A pause of read_timeout is a stall; so is a trickle: a byte every few seconds never pauses that
            # long, and 18 such uploads held every admission slot. The body must keep up a minimum rate.
            deadline = started + self.read_timeout + received / MIN_UPLOAD_RATE
            allowed = deadline - time.monotonic()
            try:
                with anyio.fail_after(max(0.0, min(self.read_timeout, allowed))):
                    message = await receive()
            except TimeoutError:
                if allowed < self.read_timeout:  # cut off by the rate, not by a pause
                    raise UploadTooSlow(received, time.monotonic() - started) from None
                raise UploadStalled(self.read_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise UploadTooLarge(self.max_body)
                body_done = not message.get("more_body", False)
            return message

        work = scope["method"] == "POST" and scope["path"] in WORK_PATHS
        if work and not self.gate.try_admit():
            await _answer(scope, receive, send, 503, "busy: too many requests are waiting; try again shortly",
                          headers={"Retry-After": str(self.gate.retry_after())})
            return
        try:
            await self.app(scope, counted_receive, send)
        except (UploadTooLarge, UploadStalled, UploadTooSlow) as err:
            # A safety net: FastAPI routes answer these HTTPExceptions themselves.
            await _answer(scope, receive, send, err.status_code, str(err.detail))
        finally:
            if work:
                self.gate.leave()


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses these before we see them; counting still applies
    return None


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


def _megabytes(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


# ------------------------------------------------------------------------------------------ the work


def safe_filename(name: str | None) -> str:
    """The last component of a client's filename, printable and at most 200 characters (echo only)."""
    name = re.split(r"[/\\]", name or "")[-1]
    name = "".join(c for c in unicodedata.normalize("NFC", name) if unicodedata.category(c)[0] != "C")
    name = name.strip().lstrip(".")[:200]
    return name or "upload"


#: The most pixels one /scan with a patch size below the default may run the network over, after scaling the
#: photo to the model's input size: a 12-MP photo at patch size 32 was 110 million for the shipped 96-px model,
#: 96 s and 3.5 GB of one request. At the default patch size or above, the service scans what the CLI scans.
#: With the shipped model this allows a 12-MP photo down to patch sizes of about 85 px.
MAX_SCAN_PIXELS = 16_000_000


def _refusal(err: ImageError, name: str) -> HTTPException:
    """The HTTP answer for an upload that is not a usable image, with a one-line message naming it."""
    reason = err.reason
    if reason.startswith("refused: at this patch size"):
        status = 422  # the photo is fine; the patch_size field asks for too much work
    elif reason.startswith("refused"):
        status = 413  # a decompression bomb or a photo too large to scan
    elif reason.startswith("not an image"):
        status = 415
    else:
        status = 400  # empty, truncated, damaged
    return HTTPException(status, f"{name}: {reason}")


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def classify(model: CrackModel, data: bytes, name: str, backend: str) -> float:
    """Crack probability of one uploaded image (raises ImageError)."""
    pixels = load_patch(data, model.input_size, name=name)
    return float(model.crack_probability(pixels[None], backend)[0])


def scan_upload(model: CrackModel, data: bytes, name: str, patch_size: int, threshold: float | None,
                backend: str = "auto", max_scan_pixels: int = MAX_SCAN_PIXELS) -> dict[str, Any]:
    """Scan one uploaded photo: the summary plus the overlay, the photo and the map as data URLs."""
    from crackscan.scan import decode_scaled, probability_png, render_overlay, scan_scaled

    started = time.perf_counter()
    try:
        # Smaller patches than the default multiply the work; at the default or above it is what scan costs.
        limit = max_scan_pixels if patch_size < PATCH_SIZE else None
        scaled, photo_size = decode_scaled(data, model.input_size / patch_size, max_scaled=limit)
    except ImageError as err:
        raise ImageError(name, err.reason) from None
    result = scan_scaled(model, scaled, photo_size, patch_size=patch_size, threshold=threshold, source=name,
                         backend=backend)
    result.seconds = time.perf_counter() - started
    overlay = render_overlay(scaled, result, max_side=IMAGE_SIDE)
    photo = scaled.copy()
    photo.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    xs, ys = result.cell_edges()
    return result.to_dict() | {
        "cell_edges": {"x": [round(float(v), 2) for v in xs], "y": [round(float(v), 2) for v in ys]},
        # Exact values for re-thresholding in the browser; the PNG rounds them to 1/255.
        "probability": np.round(result.probability.astype(np.float64), 6).tolist(),
        "overlay": _data_url(_jpeg(overlay), "image/jpeg"),
        "photo": _data_url(_jpeg(photo), "image/jpeg"),
        "map": _data_url(probability_png(result), "image/png"),
    }


# ------------------------------------------------------------------------------------- API documents


class PredictAnswer(BaseModel):
    file: str = Field(description="the uploaded file's name (sanitised, echoed only)")
    crack_probability: float = Field(ge=0, le=1)
    label: str = Field(description="the model's class name at the threshold")
    is_crack: bool
    threshold: float
    model: str = Field(description="the model file's name")


class ScanAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")

    file: str
    verdict: str = Field(description="'crack' when any map cell reaches the threshold, else 'no crack'")
    is_crack: bool
    max_probability: float
    flagged_fraction: float = Field(description="share of the photo's area in flagged cells")
    threshold: float
    regions: list[dict[str, Any]] = Field(description="connected flagged cells: box [x0, y0, x1, y1] in photo "
                                                       "pixels, max_probability, mean_probability, cells, area_fraction")
    photo_size: list[int]
    patch_size: int
    map_shape: list[int]
    cell_edges: dict[str, list[float]] = Field(description="photo-pixel boundaries of the map's columns (x) and rows (y)")
    probability: list[list[float]] = Field(description="crack probability per map cell, rows x columns")
    overlay: str = Field(description="the overlay with the verdict legend, as a JPEG data URL")
    photo: str = Field(description="the photo without overlay, as a JPEG data URL (for redrawing)")
    map: str = Field(description="the probability map as a grayscale PNG data URL, one pixel per cell, 255 = 1.0")
    model: str


class Health(BaseModel):
    status: str
    model: str
    workers: int
    running: int
    admitted: int
    capacity: int
    max_upload_bytes: int


# ---------------------------------------------------------------------------------------------- the app


def create_app(
    model_path: str | None = None,
    *,
    max_upload_bytes: int = 30 * 1024 * 1024,
    max_concurrency: int = 2,
    max_queue: int = 16,
    backend: str = "auto",
    read_timeout: float = 60.0,
    max_scan_pixels: int = MAX_SCAN_PIXELS,
) -> FastAPI:
    """The crackscan web service.

    Args:
        model_path: A model file or run folder (default: the shipped model). Loaded in the lifespan.
        max_upload_bytes: Largest request body; larger ones are answered 413.
        max_concurrency: Requests decoded and run through the model at the same time.
        max_queue: Admitted requests allowed to wait for a worker; beyond that, 503 with Retry-After.
        backend: Inference backend (``"torch"``, ``"onnx"`` or ``"auto"``, see
            :func:`crackscan.model.resolve_backend`) for /predict and for /scan's dense pass and verification
            crops (:func:`crackscan.scan.scan_scaled`).
        read_timeout: Seconds a client may pause while sending its body before it is answered 408
            (a stalled upload would otherwise hold its admission slot); the whole body must also arrive
            within ``read_timeout`` seconds plus one second per :data:`MIN_UPLOAD_RATE` bytes sent.
        max_scan_pixels: The most pixels a /scan with a patch size below the default may run the network
            over (the photo scaled by ``input_size / patch_size``); a patch size needing more is answered 422.

    Returns:
        A FastAPI application; use it with ``TestClient(app)`` as a context manager, or with uvicorn.
    """
    if max_concurrency < 1 or max_queue < 0 or max_upload_bytes < 1 or read_timeout <= 0:
        raise ValueError("max_concurrency must be >= 1, max_queue >= 0, max_upload_bytes >= 1, read_timeout > 0")
    gate = WorkGate(workers=max_concurrency, waiting=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gate.open()
        model = await anyio.to_thread.run_sync(load_model, model_path)
        # One small run through each path now, so that the first user does not wait for lazy set-up.
        await anyio.to_thread.run_sync(_warm_up, model, backend)
        app.state.model = model
        app.state.model_name = Path(model.path).name
        logger.info("model %s loaded (input %d px, threshold %.3f, scan threshold %.3f)", model.path, model.input_size,
                    model.threshold, model.scan_threshold)
        yield

    app = FastAPI(
        title="crackscan",
        version=_version(),
        description="Crack probability for patches and whole photos of concrete. " + DISCLAIMER,
        lifespan=lifespan,
    )
    app.state.gate = gate
    app.state.internal_errors = 0
    app.add_middleware(UploadGuard, gate=gate, max_body=max_upload_bytes, read_timeout=read_timeout)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        detail = "bad request: " + "; ".join(problems)
        if any(p.startswith(("file:", "photo:")) for p in problems):
            detail += " (send the image as a multipart/form-data file field)"
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Last resort only: expected failures are answered 4xx where they happen.
        app.state.internal_errors += 1
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)

    async def work(function: Callable[..., T], *args: Any) -> T:
        try:
            return await gate.run(function, *args)
        except ImageError as err:
            raise _refusal(err, err.source) from None

    @app.post("/predict", response_model=PredictAnswer, responses=_ERRORS, summary="Crack probability of one image")
    async def predict(request: Request, file: UploadFile = File(description="an image file (a patch)")) -> dict:
        model: CrackModel = request.app.state.model
        name = safe_filename(file.filename)
        data = await file.read()
        probability = await work(classify, model, data, name, backend)
        label = model.label_for(probability)
        return {"file": name, "crack_probability": round(probability, 6), "label": label,
                "is_crack": label == model.crack_class, "threshold": model.threshold,
                "model": request.app.state.model_name}

    @app.post("/scan", response_model=ScanAnswer, responses=_ERRORS, summary="Scan a whole photo for cracks")
    async def scan(
        request: Request,
        photo: UploadFile = File(description="a photo of a concrete surface"),
        patch_size: int = Form(PATCH_SIZE, ge=32, le=4096, description="side of one classified patch, in photo pixels"),
        threshold: float | None = Form(None, ge=0.0, le=1.0, description="default: the model's scan threshold"),
    ) -> dict:
        model: CrackModel = request.app.state.model
        name = safe_filename(photo.filename)
        data = await photo.read()
        result = await work(scan_upload, model, data, name, patch_size, threshold, backend, max_scan_pixels)
        return result | {"model": request.app.state.model_name}

    @app.api_route("/model", methods=["GET", "HEAD"], summary="The model's metadata")
    async def model_meta(request: Request) -> dict:
        return {"file": request.app.state.model_name, **public_meta(request.app.state.model.meta)}

    @app.api_route("/health", methods=["GET", "HEAD"], response_model=Health, summary="Liveness and load")
    async def health(request: Request) -> dict:
        return {"status": "ok", "model": request.app.state.model_name, "workers": gate.workers,
                "running": gate.running, "admitted": gate.admitted, "capacity": gate.capacity,
                "max_upload_bytes": max_upload_bytes}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/static/index.html", methods=["GET", "HEAD"], include_in_schema=False)  # not without its headers
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "empty, truncated or damaged image"},
    413: {"description": "upload over the size limit, or an image with too many pixels"},
    408: {"description": "the client stopped sending its upload for read_timeout seconds, or sent it slower than "
                          "MIN_UPLOAD_RATE on average"},
    415: {"description": "not an image"},
    422: {"description": "missing file field or bad form values, or a patch size below the default that would "
                          "scan more than max_scan_pixels"},
    503: {"description": "busy: too many requests waiting (see Retry-After)"},
}
_PAGE_HEADERS = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


#: Metadata fields that hold paths of the machine a model was trained on; /model gives only their last part.
_PATH_FIELDS = {"training": ("data", "out", "weights", "manifest"), "": ("pretrained",)}


def public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A model's metadata as /model shows it to anyone: file and folder names without the folders above them."""
    shown = json.loads(json.dumps(meta))
    for section, keys in _PATH_FIELDS.items():
        fields = shown.get(section) if section else shown
        for key in keys if isinstance(fields, dict) else ():
            if isinstance(fields.get(key), str):  # "file /abs/w.safetensors" -> "file w.safetensors"
                fields[key] = re.sub(r"\S*[/\\]\S*", lambda m: Path(m.group().replace("\\", "/")).name, fields[key])
    return shown


def _warm_up(model: CrackModel, backend: str) -> None:
    from crackscan.scan import scan_scaled

    grey = np.full((1, model.input_size, model.input_size, 3), 128, dtype=np.uint8)
    model.crack_probability(grey, backend)  # also builds the runner a scan's verification crops use
    scan_scaled(model, grey[0], (model.input_size, model.input_size), patch_size=model.input_size, backend=backend)


def _version() -> str:
    from crackscan import __version__

    return __version__


def serve(model_path: str | None = None, host: str = "127.0.0.1", port: int = 8000, **kw: Any) -> None:
    """Run the service with uvicorn until interrupted.

    Args:
        model_path: A model file or run folder (default: the shipped model).
        host: Interface to listen on; the default answers this machine only.
        port: TCP port.
        **kw: Passed to :func:`create_app` (``max_upload_bytes``, ``max_concurrency``, ``max_queue``, ``backend``).

    Raises:
        ModelError: The model file is missing or is not a crackscan model (checked before starting).
        OSError: Nothing can listen on ``host:port`` (checked before the model loads).
    """
    import uvicorn

    from crackscan.runtime import tune_allocator

    tune_allocator()
    # Fail with one clear line before uvicorn starts, rather than a lifespan traceback.
    path = _model_file(model_path)
    if path.suffix.lower() == ".onnx":
        raise ModelError(f"{path}: the service scans photos, which needs the PyTorch model (.safetensors); an "
                         "exported ONNX file only classifies patches (predict, evaluate)")
    read_meta(path)
    _check_listen(host, port)
    uvicorn.run(create_app(model_path, **kw), host=host, port=port, log_level="info")


def _check_listen(host: str, port: int) -> None:
    """An OSError naming the address when nothing can listen on it (a port in use, a host not this machine's),
    before the model loads; uvicorn would log it and exit with a code of its own."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    # Every address the name gives, bound as asyncio's server binds it: a family this machine cannot make a
    # socket of is skipped, IPv6 sockets are IPv6-only, and any failure to bind (a port in use, an address not
    # this machine's) is said, as it would end the server.
    tried = 0
    for family, kind, proto, _, address in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue
        tried += 1
        with probe:
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
            except OSError as err:
                raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    if not tried:
        raise OSError(f"cannot listen on {host}:{port} (no address of it can be used here)")


def _model_file(model_path: str | None) -> Path:
    path = Path(model_path) if model_path is not None else default_model_path()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    return path
