"""ONNX export and the ONNX Runtime backend.

The exported graph takes what the decoder produces: ``pixels``, uint8, N x S x S x 3 (RGB, HWC), and
does the cast, the normalisation and the layout change itself, so a caller in any language only has
to decode and resize, and passes a quarter of the bytes a float input would need. In the fp32 graph
ONNX Runtime normalises whole NCHW planes at little cost; in the int8 graph it normalised the NHWC
input, a broadcast over a last axis of 3 that took ~20% of the time, so there the normalisation is
folded into the first convolution (:func:`_fold_normalisation`). Output: ``logits``, float32, N x 2.
Every crackscan field travels in the file's ``metadata_props`` (the full metadata JSON under
``crackscan``, plus classes, crack_index, input_size, mean, std and threshold as separate keys for
non-Python readers).

The legacy TorchScript exporter (``dynamo=False``, opset 17) is used: it needs no ``onnxscript``,
folds BatchNorm into the convolutions, and gives a plain graph that ONNX Runtime's optimiser and
quantiser handle well; the dynamo exporter moves to opset 18 and adds a dependency for no gain on
this network.

int8 export is ONNX Runtime static quantization of that folded graph: QDQ format (the format ORT's
CPU kernels are tuned for), uint8 activations, int8 weights, one scale per tensor, MinMax
calibration. Per-tensor was chosen by measurement on the shipped model (2,000 held-out Mendeley
patches, 256 calibration images): labels agreed with fp32 on 99.95% of them against 99.65% with
per-channel weights; Percentile and Entropy calibration were no better than MinMax and four times
slower.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crackscan.images import ImageError, ImageSource, describe, load_patch
from crackscan.model import META_KEY, CrackModel, ModelError, _check_meta, atomic_write, softmax
from crackscan.runtime import cpu_count

OPSET = 17
INPUT, OUTPUT = "pixels", "logits"
#: fp32 export must reproduce PyTorch's logits to this (float32 rounding through ~50 layers).
FP32_TOLERANCE = 1e-3
#: Bumped whenever an exported graph changes (the patch graph or scan's whole-image graph), so that stale
#: cache entries are not reused.
GRAPH_VERSION = 2
#: Cached graphs kept (two per model that has scanned photos); older ones (models no longer in use) are
#: removed when a new one is written.
CACHE_KEEP = 16
#: int8 calibration uses at most this many images (evenly spaced through the given list): MinMax ranges
#: settle within a few hundred, and calibration time grows linearly.
MAX_CALIBRATION = 512


class ExportError(ModelError):
    """The exported model does not reproduce the PyTorch model."""


class _BorderedConv(nn.Module):
    """A convolution plus a constant map: the first layer with the input normalisation folded in."""

    def __init__(self, conv: nn.Conv2d, border: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("border", border)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.border


def _fold_normalisation(net: nn.Module, mean: Sequence[float], std: Sequence[float], size: int) -> nn.Module:
    """A copy of ``net`` that takes raw 0-255 pixels at ``size`` x ``size``: its first convolution (and the
    BatchNorm after it) absorbs the per-channel ``(x / 255 - mean) / std``.

    Why: ONNX Runtime runs the normalisation on the NHWC input, broadcasting over a last axis of 3,
    which took ~20% of the int8 network's time (profiled: 9 of 47 ms per batch of 64 at 96 px).
    Folded, it costs nothing. Scaling the weights by ``1 / (255 std)`` and moving ``mean`` into the bias
    is exact inside the image; at the border the original pads the *normalised* input with zeros, so
    the taps that fall on padding must not carry the mean. ``border`` adds back, per output pixel, what
    those taps subtract: a constant map for a fixed input size, zero away from the edges.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()  # the caller's module is left as it was
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name)
    siblings = list(parent.named_children())
    position = [n for n, _ in siblings].index(attr)
    after = siblings[position + 1] if position + 1 < len(siblings) else None
    norm = after[1] if after is not None and isinstance(after[1], nn.BatchNorm2d) else None
    first_layer = nn.Sequential(conv, norm if norm is not None else nn.Identity())  # as it was, for the check
    fused = fuse_conv_bn_eval(conv, norm) if norm is not None else conv
    scale = 1.0 / (torch.tensor(std, dtype=torch.float32) * 255.0)
    shift = torch.tensor(mean, dtype=torch.float32) * 255.0
    folded = copy.deepcopy(fused).requires_grad_(False)
    if folded.bias is None:
        folded.bias = nn.Parameter(torch.zeros(folded.out_channels), requires_grad=False)
    with torch.no_grad():
        folded.weight.mul_(scale.view(1, -1, 1, 1))
        # A mean-grey image through the folded weights gives, at each output pixel, what the in-bounds
        # taps subtract in the original; with every tap in bounds it is ``everywhere``.
        grey = shift.view(1, -1, 1, 1).expand(1, conv.in_channels, size, size)
        inside = F.conv2d(grey, folded.weight, None, folded.stride, folded.padding, folded.dilation, folded.groups)
        everywhere = (folded.weight.sum(dim=(2, 3)) * shift).sum(dim=1)
        folded.bias.sub_(everywhere)
        border = (everywhere.view(1, -1, 1, 1) - inside).contiguous()
    layer = _BorderedConv(folded, border)
    # Check the new first layer against the old one on normalised pixels, the normalisation written
    # out afresh (not with ``scale`` and ``shift``, which a mistake here would share).
    with torch.inference_mode():
        probe = torch.rand(2, conv.in_channels, size, size, generator=torch.Generator().manual_seed(0)) * 255.0
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        want = first_layer((probe / 255.0 - mean_t) / std_t)
        diff = float((layer(probe) - want).abs().max())
    if diff > 1e-4 * max(1.0, float(want.abs().max())):
        raise ExportError(f"folding the normalisation into the first layer changed its output by {diff:.2e}")
    setattr(parent, attr, layer)
    if norm is not None:
        setattr(parent, after[0], nn.Identity())
    return net


class _PixelsIn(nn.Module):
    """uint8 NHWC pixels -> a network's output, normalisation included.

    ``fold`` puts the normalisation into the first layer (:func:`_fold_normalisation`): the int8 graph
    is ~19% faster so. The fp32 graph is not: ONNX Runtime normalises it cheaply on NCHW planes, and the
    fold's border map stops it fusing the first convolution with its activation (~5% slower, measured).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], size: int, fold: bool = False):
        super().__init__()
        self.net = _fold_normalisation(net, mean, std, size) if fold else net
        self.fold = fold
        if not fold:  # folded, the first layer holds them
            self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("scale", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        return self.net(x if self.fold else (x - self.shift) / self.scale)


def _trace(net: nn.Module, size: int, mean: Sequence[float], std: Sequence[float],
           outputs: Sequence[str] = (OUTPUT,), fold: bool = False, spatial: bool = False) -> bytes:
    """The fp32 ONNX graph of ``net`` behind the uint8 pixel input, as bytes.

    ``spatial``: the input's height and width are free too, and so are the outputs' last two axes.
    """
    if fold and spatial:
        raise ValueError("a folded normalisation has a fixed-size border map: it cannot take free image sizes")
    if spatial:
        axes = {INPUT: {0: "batch", 1: "height", 2: "width"}, **{n: {0: "batch", 2: "rows", 3: "cols"} for n in outputs}}
    else:
        axes = {name: {0: "batch"} for name in (INPUT, *outputs)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter announces its own deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _PixelsIn(net, mean, std, size, fold).eval(),
            (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(outputs),
            dynamic_axes=axes,
        )
    return buffer.getvalue()


def _onnx_bytes(model: CrackModel, fold: bool = False) -> bytes:
    """The fp32 ONNX graph of a model, with its metadata, as bytes (``fold``: see :class:`_PixelsIn`)."""
    import onnx

    net = model.network("export")
    proto = onnx.load_from_string(_trace(net, model.input_size, model.mean, model.std, fold=fold))
    _set_metadata(proto, model.meta)
    return proto.SerializeToString()


def frozen_runner(net: nn.Module, size: int, mean: Sequence[float], std: Sequence[float],
                  n_outputs: int = 2) -> Callable[[np.ndarray], list[np.ndarray]]:
    """ONNX Runtime in place of a frozen (eval-mode) module: NxSxSx3 uint8 pixels -> its float32 outputs.

    Training uses it for the frozen base, whose outputs are computed once per image and view and never
    change: ONNX Runtime runs that pass ~1.8x faster than eager PyTorch on 2 cores, and building the
    session takes under a second. Raises ImportError without onnxruntime.
    """
    session = _session(_trace(net, size, mean, std, [f"output{i}" for i in range(n_outputs)]))
    return lambda pixels: _run(session, pixels)


def _run(session: Any, pixels: np.ndarray, outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """``session.run`` on uint8 pixels. ONNX Runtime's exceptions derive from ``Exception`` only: they are
    raised as ``RuntimeError``, which batch commands report per file as they do PyTorch's."""
    try:
        return session.run(outputs, {INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RuntimeError(f"ONNX Runtime failed on input {tuple(pixels.shape)}: {first[:300]}") from err


def _set_metadata(proto: Any, meta: dict[str, Any]) -> None:
    fields = {
        META_KEY: json.dumps(meta),
        "classes": json.dumps(meta["classes"]),
        "crack_index": str(meta["crack_index"]),
        "input_size": str(meta["input_size"]),
        "mean": json.dumps(meta["mean"]),
        "std": json.dumps(meta["std"]),
        "threshold": str(meta.get("threshold", 0.5)),
        "input_format": "uint8 NxHxWx3 RGB; normalisation is inside the graph",
    }
    del proto.metadata_props[:]
    for key, value in fields.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "crackscan"


def _session(source: bytes | str, memory_pattern: bool = True):
    """An ONNX Runtime session on the usable cores. ``memory_pattern=False``: ONNX Runtime does not
    reserve, from the second run on, one block for all of the first run's activations. For one pass over a
    whole photo, run again and again in a folder, that is ~40% less memory at the same speed (one-off, five
    runs over a 12-MP photo at the default scale: 0.41 instead of 0.70 GB above the session's start)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_mem_pattern = memory_pattern
    options.intra_op_num_threads = cpu_count()
    options.inter_op_num_threads = 1  # one chain of layers: parallelism is inside each operator
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`crackscan.model.atomic_write`: readers never see half a file."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def cache_dir() -> Path:
    """Where exported graphs of loaded models are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crackscan" / "onnx"


def model_digest(model: CrackModel) -> str:
    """A hash of the weights and metadata (and exporter): the cache key of a model's ONNX graph."""
    h = hashlib.sha256(json.dumps(model.meta, sort_keys=True).encode())
    h.update(f"{torch.__version__} opset {OPSET} graph {GRAPH_VERSION}".encode())
    for name, tensor in model.network("export").state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _prune_cache(folder: Path, keep: int = CACHE_KEEP) -> None:
    """Remove all but the ``keep`` most recently used graphs (best effort)."""
    try:
        entries = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[keep:]:
            stale.unlink(missing_ok=True)
    except OSError:  # another process pruning at the same time, or a read-only folder
        pass


def _cached_session(model: CrackModel, kind: str, build: Callable[[], bytes], **options: Any) -> tuple[Any, str]:
    """An ONNX Runtime session of one of a model's graphs, exported once and cached on disk.

    The graph is cached under ``$XDG_CACHE_HOME/crackscan/onnx/`` (``~/.cache/...`` by default), keyed
    by a hash of the weights and metadata plus ``kind``, so the next process that loads the same model
    skips the export. A cache folder that cannot be written only costs the cache: the graph runs from
    memory (the returned path is then empty). ``options`` go to :func:`_session`.
    """
    folder = cache_dir()
    path = folder / f"{model_digest(model)}{kind}.onnx"
    try:
        cached = path.is_file()
    except OSError:  # a cache folder this user may not enter: the graph runs from memory
        cached = False
    if cached:
        try:
            session = _session(str(path), **options)
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used: kept by _prune_cache
            return session, str(path)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            with contextlib.suppress(OSError):
                path.unlink()
    data = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, data)
    except OSError:  # a read-only home still gets the fast backend, from memory
        return _session(data, **options), ""
    _prune_cache(folder)
    return _session(str(path), **options), str(path)


class _CellLogits(nn.Module):
    """A classifier's base, then :func:`crackscan.scan.cell_weights` (without bias) at every feature cell:
    what :mod:`crackscan.scan` combines into patch logits (``scan.cell_logits`` computes the same in
    PyTorch, tile by tile)."""

    def __init__(self, model: CrackModel):
        from crackscan.scan import cell_weights

        super().__init__()
        self.features = model.network("scan").features
        self.register_buffer("weight", cell_weights(model).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.features(x), self.weight)


def cell_logits_runner(model: CrackModel) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime over a whole image: H x W x 3 uint8 -> M x ceil(H/32) x ceil(W/32) float32 cell logits.

    One pass over the whole image: faster than PyTorch's stage-by-stage tiles on 2 cores, but its
    memory grows with the image (``scan`` uses it up to :data:`crackscan.scan.WHOLE_PASS_PIXELS`).
    Exported once per model and cached like :meth:`OnnxRunner.from_model`'s graph. Raises ImportError
    without onnxruntime.
    """
    model.network("scan")  # an ONNX-file model has no base to export: say so before anything else

    def build() -> bytes:
        data = _trace(_CellLogits(model).eval(), model.input_size, model.mean, model.std, outputs=("cells",),
                      spatial=True)
        # Checked once, when exported: an image of uneven size against PyTorch's own tiled pass.
        from crackscan.scan import cell_logits

        probe = np.random.default_rng(0).integers(0, 256, (model.input_size + 45, 2 * model.input_size + 13, 3),
                                                  dtype=np.uint8)
        got, want = _run(_session(data), probe[None])[0][0], cell_logits(model, probe).numpy()
        # Relative to the largest logit: float32 rounding through ~50 layers stays near 1e-6 of it.
        scale = max(float(np.abs(want).max()), 1e-6)
        if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=1e-4 * scale):
            raise ExportError(f"the whole-image ONNX graph does not reproduce PyTorch's cell logits (shapes "
                              f"{got.shape} and {want.shape})")
        return data

    session, _ = _cached_session(model, "-cells", build, memory_pattern=False)
    return lambda pixels: _run(session, pixels[None])[0][0]


def _check_graph(session: Any, meta: dict[str, Any], path: Path) -> None:
    """The graph must take what its metadata says (uint8 N x S x S x 3 ``pixels``) and give ``logits`` for every
    class: an edited or mismatched file would otherwise fail inside ONNX Runtime on the first batch."""
    inputs, outputs = session.get_inputs(), {o.name: o for o in session.get_outputs()}
    size, classes = int(meta["input_size"]), len(meta["classes"])
    wanted = [size, size, 3]
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(uint8)" \
            or list(inputs[0].shape[1:]) != wanted:
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ModelError(f"{path}: its graph takes {found}, but its metadata says uint8 '{INPUT}' "
                         f"[batch, {size}, {size}, 3]: not a crackscan export as written, or edited since")
    shape = getattr(outputs.get(OUTPUT), "shape", None)
    if shape is None or shape[-1] != classes:
        raise ModelError(f"{path}: its graph gives no '{OUTPUT}' for the {classes} classes its metadata names")


class OnnxRunner:
    """ONNX Runtime inference on uint8 NHWC patches; the fast backend of :class:`CrackModel`.

    Attributes:
        session: The ``onnxruntime.InferenceSession`` (intra-op threads = usable cores, all graph
            optimisations).
        meta: The crackscan metadata of the model the graph was exported from.
        path: The ONNX file the session was read from; empty when it lives only in memory.
    """

    def __init__(self, session: Any, meta: dict[str, Any], path: str = ""):
        self.session = session
        self.meta = meta
        self.path = path

    @classmethod
    def from_model(cls, model: CrackModel) -> "OnnxRunner":
        """A runner for a loaded model, exported once and cached (see :func:`_cached_session`)."""
        session, path = _cached_session(model, "", lambda: _onnx_bytes(model))
        return cls(session, model.meta, path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "OnnxRunner":
        """Open an exported crackscan ONNX file; its metadata comes from the file itself.

        Raises:
            ModelError: The file is missing, not an ONNX model, or carries no crackscan metadata.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such ONNX file")
        try:
            session = _session(str(path))
        except Exception as err:  # onnxruntime raises its own exception types, with multi-line text
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"{path}: not a readable ONNX model ({first[:200]})") from None
        props = session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise ModelError(f"{path}: not a crackscan ONNX export (no '{META_KEY}' metadata)")
        try:
            meta = json.loads(props[META_KEY])
        except json.JSONDecodeError:
            raise ModelError(f"{path}: its '{META_KEY}' metadata is not valid JSON") from None
        if not isinstance(meta, dict):
            raise ModelError(f"{path}: its '{META_KEY}' metadata is a JSON {type(meta).__name__}, not an object")
        _check_meta(str(path), meta)  # the same checks a .safetensors model file passes
        _check_graph(session, meta, path)
        return cls(session, meta, str(path))

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Raw logits of a batch.

        Args:
            pixels: N x S x S x 3 uint8 RGB patches at the model's input size S.

        Returns:
            N x C float32 logits (C = number of classes).
        """
        size = self.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"expected N x {size} x {size} x 3 pixels, got shape {tuple(pixels.shape)}")
        return _run(self.session, pixels, [OUTPUT])[0]


@dataclass
class ExportReport:
    """What an export wrote and how closely it reproduces PyTorch.

    Attributes:
        path: The ONNX file written.
        opset: ONNX opset of the graph.
        int8: Whether the weights and activations are int8-quantized.
        size_bytes: Size of the file.
        n_parity: Images the parity check ran on.
        max_abs_logit_diff: Largest absolute difference between ONNX Runtime and PyTorch logits.
        label_agreement: Share of parity images given the same label at the model's threshold.
        max_abs_probability_diff: Largest absolute difference in crack probability.
        threshold: The decision threshold the labels were compared at.
        parity_images: ``"given"`` or ``"generated"`` (synthetic patches when no images were given).
        n_calibration: Images int8 calibration used (0 for fp32).
        quantization: How the int8 graph was made; None for fp32.
        skipped: Parity or calibration images that could not be read, one message each.
    """

    path: str
    opset: int
    int8: bool
    size_bytes: int
    n_parity: int
    max_abs_logit_diff: float
    label_agreement: float
    max_abs_probability_diff: float
    threshold: float
    parity_images: str
    n_calibration: int = 0
    quantization: str | None = None
    skipped: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        out = asdict(self)
        out["skipped"] = list(self.skipped)
        return out


def _pixels(sources: Sequence[ImageSource], size: int, what: str, skipped: list[str]) -> np.ndarray:
    """Decoded patches of ``sources``; unreadable ones are reported on stderr and listed in ``skipped``."""
    batch = []
    for source in sources:
        try:
            batch.append(load_patch(source, size))
        except ImageError as err:
            skipped.append(str(err))
            print(f"warning: {what} image skipped: {err}", file=sys.stderr)
    if not batch:
        first = describe(sources[0]) if len(sources) else "none given"
        raise ValueError(f"no readable {what} images (first: {first})")
    return np.stack(batch)


def _generated(size: int, n: int = 32) -> np.ndarray:
    from crackscan.demo import concrete_patch

    rng = np.random.default_rng(0)
    return np.stack([np.asarray(concrete_patch(rng, size, i % 2 == 0)) for i in range(n)])


def _spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` items, evenly spaced, so that a sorted folder of two classes gives both."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over uint8 batches."""

    def __init__(self, pixels: np.ndarray, batch: int = 32):
        self._batches = iter([pixels[i : i + batch] for i in range(0, len(pixels), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantiser logs routine notes on the root logger at WARNING; keep them off the user's screen."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _quantize(fp32: bytes, calibration: np.ndarray) -> Any:
    """Static int8 quantization of an fp32 graph (QDQ, per-tensor, MinMax; see the module docstring) -> ModelProto."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        # Shape inference and graph clean-up first, as ORT recommends; symbolic shapes are not needed here.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return onnx.load(str(out))


def export_onnx(
    model: CrackModel,
    path: str | os.PathLike,
    *,
    int8: bool = False,
    calibration: Sequence[ImageSource] | None = None,
    parity: Sequence[ImageSource] | None = None,
) -> ExportReport:
    """Write an ONNX file of ``model`` and check it against PyTorch.

    The file is written atomically; an fp32 export that fails the parity check is not left behind.

    Args:
        model: The model to export.
        path: The ``.onnx`` file to write.
        int8: Static int8 quantization (QDQ, per-tensor, MinMax), calibrated on ``calibration``. Its
            logits differ from PyTorch's by more than fp32 rounding; the report says by how much and how
            many labels agree, and the export never fails on it.
        calibration: Training images of every class for int8 calibration (required with ``int8``); at
            most 512, evenly spaced through the list, are used.
        parity: Images for the parity check; 32 generated concrete-like patches when None.

    Returns:
        The report: file, size, logit difference and label agreement at the model's threshold.

    Raises:
        ExportError: An fp32 export whose logits differ from PyTorch's by more than 1e-3.
        ValueError: ``path`` not named ``*.onnx``, ``int8`` without calibration images, or no readable
            calibration/parity image.
    """
    path = Path(path)
    if path.suffix != ".onnx":  # crackscan knows an ONNX model by this suffix; it also spares model files
        raise ValueError(f"{path}: an ONNX export's file name must end in .onnx")
    if int8 and not calibration:
        raise ValueError("int8 export needs calibration images (training images of every class, a few hundred)")
    skipped: list[str] = []
    check = _pixels(parity, model.input_size, "parity", skipped) if parity else _generated(model.input_size)
    quantization, n_calibration = None, 0
    if int8:
        calib = _pixels(_spread(list(calibration), MAX_CALIBRATION), model.input_size, "calibration", skipped)
        proto = _quantize(_onnx_bytes(model, fold=True), calib)
        _set_metadata(proto, model.meta)  # the quantiser drops metadata_props
        data = proto.SerializeToString()
        n_calibration = len(calib)
        quantization = f"onnxruntime static QDQ, uint8 activations, int8 weights per tensor, MinMax on {n_calibration} images"
    else:
        data = _onnx_bytes(model)
    ours = OnnxRunner(_session(data), model.meta).logits(check)
    reference = model.logits(check)
    diff = float(np.abs(ours - reference).max())
    p_ours, p_ref = softmax(ours)[:, model.crack_index], softmax(reference)[:, model.crack_index]
    # Labels as users get them: at the model's threshold, which may lie far from 0.5.
    agree = float(np.mean((p_ours >= model.threshold) == (p_ref >= model.threshold)))
    if not int8 and diff > FP32_TOLERANCE:
        raise ExportError(
            f"{path}: not written: ONNX logits differ from PyTorch by {diff:.2e} (tolerance {FP32_TOLERANCE:g})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, data)
    return ExportReport(
        path=str(path),
        opset=OPSET,
        int8=int8,
        size_bytes=path.stat().st_size,
        n_parity=len(check),
        max_abs_logit_diff=diff,
        label_agreement=agree,
        max_abs_probability_diff=float(np.abs(p_ours - p_ref).max()),
        threshold=model.threshold,
        parity_images="given" if parity else "generated",
        n_calibration=n_calibration,
        quantization=quantization,
        skipped=tuple(skipped),
    )
