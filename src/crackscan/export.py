"""ONNX export and the ONNX Runtime backend.

The exported graph takes what the decoder produces: ``pixels``, uint8, N x S x S x 3 (RGB, HWC), and
does the cast, the normalisation and the layout change itself, so a caller in any language only has
to decode and resize. Output: ``logits``, float32, N x 2. Every crackscan field travels in the
file's ``metadata_props`` (the full metadata JSON under ``crackscan``, plus classes, crack_index,
input_size, mean, std and threshold as separate keys for non-Python readers).

The legacy TorchScript exporter (``dynamo=False``, opset 17) is used: it needs no ``onnxscript`` and
gives a plain graph that ONNX Runtime's optimiser and quantiser handle well; the dynamo exporter
moves to opset 18 and adds a dependency for no gain on this network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from crackscan.images import ImageError, ImageSource, load_patch
from crackscan.model import META_KEY, CrackModel, ModelError
from crackscan.runtime import cpu_count

OPSET = 17
INPUT, OUTPUT = "pixels", "logits"
#: fp32 export must reproduce PyTorch's logits to this (float32 rounding through ~50 layers).
FP32_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch model."""


class _PixelsIn(nn.Module):
    """uint8 NHWC pixels -> the network's logits, normalisation included."""

    def __init__(self, model: CrackModel):
        super().__init__()
        self.net = model.module
        self.register_buffer("shift", torch.tensor(model.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", torch.tensor(model.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        return self.net((x - self.shift) / self.scale)


def _onnx_bytes(model: CrackModel) -> bytes:
    """The fp32 ONNX graph of a model, with its metadata, as bytes."""
    import onnx

    wrapper = _PixelsIn(model).eval()
    size = model.input_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter announces its own deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _set_metadata(proto, model.meta)
    return proto.SerializeToString()


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


def _session(source: bytes | str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def cache_dir() -> Path:
    """Where exported graphs of loaded models are kept between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crackscan" / "onnx"


def model_digest(model: CrackModel) -> str:
    """A hash of the weights and metadata: the cache key of a model's ONNX graph."""
    h = hashlib.sha256(json.dumps(model.meta, sort_keys=True).encode())
    h.update(torch.__version__.encode())
    for name, tensor in model.module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


class OnnxRunner:
    """ONNX Runtime inference on uint8 NHWC patches; the fast backend of :class:`CrackModel`."""

    def __init__(self, session: Any, meta: dict[str, Any], path: str = ""):
        self.session = session
        self.meta = meta
        self.path = path

    @classmethod
    def from_model(cls, model: CrackModel) -> "OnnxRunner":
        """Export once and cache the graph (keyed by the weights' hash); later loads reuse it."""
        path = cache_dir() / f"{model_digest(model)}.onnx"
        if path.is_file():
            try:
                return cls(_session(str(path)), model.meta, str(path))
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                path.unlink(missing_ok=True)
        data = _onnx_bytes(model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError:  # a read-only home still gets the fast backend, from memory
            return cls(_session(data), model.meta)
        return cls(_session(str(path)), model.meta, str(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "OnnxRunner":
        """Open an exported crackscan ONNX file; its metadata comes from the file itself."""
        session = _session(str(path))
        props = session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise ModelError(f"{path}: not a crackscan ONNX export (no '{META_KEY}' metadata)")
        return cls(session, json.loads(props[META_KEY]), str(path))

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 -> N x 2 float32 logits."""
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]


@dataclass
class ExportReport:
    """What an export wrote and how closely it reproduces PyTorch."""

    path: str
    opset: int
    int8: bool
    size_bytes: int
    n_parity: int
    max_abs_logit_diff: float
    label_agreement: float
    parity_images: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pixels(sources: Sequence[ImageSource], size: int, what: str) -> np.ndarray:
    batch = []
    for source in sources:
        try:
            batch.append(load_patch(source, size))
        except ImageError as err:
            print(f"warning: {what} image skipped: {err}")
    if not batch:
        raise ValueError(f"no readable {what} images")
    return np.stack(batch)


def _generated(size: int, n: int = 32) -> np.ndarray:
    from crackscan.demo import concrete_patch

    rng = np.random.default_rng(0)
    return np.stack([np.asarray(concrete_patch(rng, size, i % 2 == 0)) for i in range(n)])


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over uint8 batches."""

    def __init__(self, pixels: np.ndarray, batch: int = 16):
        self._batches = iter([pixels[i : i + batch] for i in range(0, len(pixels), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def export_onnx(
    model: CrackModel,
    path: str | os.PathLike,
    *,
    int8: bool = False,
    calibration: Sequence[ImageSource] | None = None,
    parity: Sequence[ImageSource] | None = None,
) -> ExportReport:
    """Write an ONNX file of ``model`` and check it against PyTorch.

    Args:
        model: The model to export.
        path: The ``.onnx`` file to write.
        int8: Static int8 quantization (QDQ, per-channel weights), calibrated on ``calibration``.
        calibration: Training images for int8 calibration (required with ``int8``; a few hundred suffice).
        parity: Images for the parity check; generated patches when None.

    Raises:
        ExportError: An fp32 export whose logits differ from PyTorch's by more than 1e-3.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fp32 = _onnx_bytes(model)
    if int8:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if not calibration:
            raise ValueError("int8 export needs calibration images (training images, a few hundred)")
        calib = _pixels(calibration, model.input_size, "calibration")
        with tempfile.TemporaryDirectory() as tmp:
            src, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
            src.write_bytes(fp32)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(path), _Calibration(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )
        proto = onnx.load(str(path))
        _set_metadata(proto, model.meta)  # the quantiser drops metadata_props
        onnx.save(proto, str(path))
    else:
        path.write_bytes(fp32)
    check = _pixels(parity, model.input_size, "parity") if parity else _generated(model.input_size)
    runner = OnnxRunner.from_file(path)
    ours = runner.logits(check)
    reference = model.logits(check)
    diff = float(np.abs(ours - reference).max())
    agree = float(np.mean(ours.argmax(1) == reference.argmax(1)))
    report = ExportReport(
        path=str(path), opset=OPSET, int8=int8, size_bytes=path.stat().st_size, n_parity=len(check),
        max_abs_logit_diff=diff, label_agreement=agree, parity_images="given" if parity else "generated",
    )
    if not int8 and (diff > FP32_TOLERANCE or agree < 1.0):
        raise ExportError(f"{path}: ONNX logits differ from PyTorch by {diff:.2e} (agreement {agree:.3f})")
    return report
