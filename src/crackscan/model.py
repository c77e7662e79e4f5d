"""Build, save and load crack classifiers: MobileNetV2 with a two-class head.

A model file is one ``.safetensors`` file: the weights, plus a JSON metadata document stored in the
safetensors header under the key ``crackscan``. It describes itself (timm's ``pretrained_cfg`` idea):
classes, crack class, input size, normalisation, decision threshold, training config, metrics,
package versions. :func:`load_model` reads it for every consumer; nothing is unpickled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import platform
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from crackscan.images import ImageSource
from crackscan.runtime import cpu_name
from crackscan.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

ARCHITECTURE = "mobilenet_v2"
FORMAT = "crackscan-model"
FORMAT_VERSION = 1
META_KEY = "crackscan"
FEATURE_DIM = 1280
#: Blocks of ``features`` from this index up are fine-tuned in phase 2 (the 160- and 320-channel
#: inverted residuals and the final 1x1 conv: 76% of the parameters, 30% of the FLOPs at any size).
DEFAULT_UNFREEZE_FROM = 14

SHIPPED_MODEL = "crack-mobilenetv2.safetensors"
#: Patches per network call inside :meth:`CrackModel.crack_probability`.
INFERENCE_CHUNK = 128


class ModelError(ValueError):
    """A model file that cannot be used, or weights that cannot be had; the message says what to do."""


#: Network input sizes a model file may have (MobileNetV2 needs 32 px for its five stride-2 stages).
INPUT_SIZES = range(32, 1025)


def build_model(num_classes: int = 2, dropout: float = 0.2, dense_head: int = 0) -> nn.Module:
    """torchvision MobileNetV2 with a new head (dropout + linear), randomly initialised.

    ``dense_head`` > 0 adds ``model.dense_head``, a ``dense_head x dense_head`` convolution from the base's
    features to one crack-vs-rest logit: the whole-photo scan's head (:mod:`crackscan.dense_head`).
    The network's forward pass does not use it.
    """
    model = mobilenet_v2()
    model.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(FEATURE_DIM, num_classes))
    nn.init.normal_(model.classifier[1].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[1].bias)
    if dense_head:
        model.dense_head = nn.Conv2d(FEATURE_DIM, 1, dense_head)
    return model


#: Where a model file keeps its dense head (see :func:`build_model`).
DENSE_HEAD_WEIGHT = "dense_head.weight"


def dense_kernel(input_size: int) -> int:
    """Feature cells across one patch: the side of the dense head's kernel (3 for 96-px patches)."""
    return max(1, -(-input_size // 32))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from ``.pth``/``.pt`` read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only=True refuses any pickled object but tensors and plain containers: no code runs.
        raise ModelError(
            f"{path}: refused: not a plain state dict (it pickles other Python objects, or is not a .pth file); "
            "crackscan reads .pth files with weights_only=True"
        ) from None
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as err:
        raise ModelError(f"{path}: cannot read weights ({str(err).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def weights_keyword(weights: str | os.PathLike | None) -> str | None:
    """``"none"`` or ``"imagenet"`` when a ``--weights`` value is one of those words (any case, None for none),
    else None: a file."""
    word = "none" if weights is None else str(weights).lower()
    return word if word in ("none", "imagenet") else None


def describe_weights(weights: str | os.PathLike | None) -> str:
    """How a run's metadata names a ``--weights`` value (what :func:`load_pretrained_base` returns), without
    reading anything."""
    keyword = weights_keyword(weights)
    if keyword == "none":
        return "none (random initialisation)"
    if keyword == "imagenet":
        return f"torchvision {MobileNet_V2_Weights.IMAGENET1K_V1}"
    return f"file {Path(weights).resolve()}"


def load_pretrained_base(model: nn.Module, weights: str | os.PathLike | None) -> str:
    """Put ImageNet weights into ``model.features``.

    Args:
        model: A model from :func:`build_model`.
        weights: ``"imagenet"`` for torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1`` (downloaded to
            the torch cache on first use), a local ``.safetensors``/``.pth`` state dict, or ``None`` /
            ``"none"`` to train from scratch.

    Returns:
        A description of the weights used, for the run's metadata.
    """
    source = describe_weights(weights)
    keyword = weights_keyword(weights)
    if keyword == "none":
        return source
    if keyword == "imagenet":
        try:
            state = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as err:  # urllib, ssl, socket: all mean "no weights"
            raise ModelError(
                "cannot download torchvision's ImageNet weights for MobileNetV2 "
                f"({type(err).__name__}: {err}). Offline? Pass a local state dict with "
                "--weights FILE (.safetensors or .pth); a crackscan model file serves too, e.g. the shipped "
                f"{default_model_path()} (its base was fine-tuned on the Mendeley crack data: do not then score "
                "the model on that data). --weights none trains from scratch, which needs far more images."
            ) from None
    else:
        state = read_state_dict(weights)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ModelError(f"{weights}: no 'features.*' tensors: not a torchvision MobileNetV2 state dict")
    try:
        model.features.load_state_dict(features, strict=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ModelError(f"{weights}: does not fit MobileNetV2: {detail}") from None
    return source


def split_base(model: nn.Module, unfreeze_from: int) -> tuple[nn.Module, nn.Module]:
    """The frozen lower base and the trainable rest (upper base, pooling, head) as two callables."""
    lower = model.features[:unfreeze_from]
    upper = nn.Sequential(
        model.features[unfreeze_from:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier
    )
    return lower, upper


@dataclass
class Prediction:
    """One image's result. ``error`` is set (and the numbers are NaN) when the image could not be read."""

    source: str
    probability: float
    label: str
    is_crack: bool
    error: str | None = None
    #: ``(width, height)``, for files large enough to be more than a patch (None otherwise): upright for a JPEG,
    #: as stored for other formats (whose orientation would cost a second decode to read).
    image_size: tuple[int, int] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "crack_probability": None if self.error else round(self.probability, 6),
            "label": self.label,
            "error": self.error,
        }


def check_threshold(threshold: float | None) -> None:
    """A decision threshold given by a caller must be a probability (NaN is not: it flags nothing)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")


def _check_uint8(pixels: Any, what: str) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        kind = pixels.dtype if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise TypeError(f"{what} must be a uint8 numpy array (0-255 RGB), got {kind}: a float or 16-bit array "
                        "would be cast without a word (values wrap or become 0); scale floats in [0, 1] by 255")


def check_image(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` if it is an H x W x 3 uint8 RGB array, else a TypeError or ValueError saying what it is."""
    _check_uint8(pixels, "an image's pixels")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ValueError(f"expected H x W x 3 RGB pixels, got shape {tuple(pixels.shape)}")
    return pixels


def check_patches(pixels: np.ndarray, size: int) -> None:
    """Patches for the network must be N x size x size x 3 uint8 (see :func:`check_image`); a batch of another
    size would be classified at the wrong scale."""
    _check_uint8(pixels, "patches")
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise ValueError(f"expected N x {size} x {size} x 3 patches at the model's input size, got shape "
                         f"{tuple(pixels.shape)} (crackscan.images.load_patch brings an image to it)")


@dataclass
class CrackModel:
    """A loaded classifier and its metadata: what every command uses.

    Attributes:
        module: The PyTorch network, in eval mode, channels_last; None for a model loaded from an
            exported ONNX file (fp32 or int8), which classifies patches with ONNX Runtime only.
        meta: The metadata document stored with the weights.
    """

    module: nn.Module | None
    meta: dict[str, Any]
    path: str = ""
    _onnx: Any = field(default=None, repr=False)
    _onnx_made_from: Any = field(default=None, repr=False)  # weights_version(module) when _onnx was exported

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def crack_index(self) -> int:
        return int(self.meta["crack_index"])

    @property
    def crack_class(self) -> str:
        return self.classes[self.crack_index]

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @property
    def scan_threshold(self) -> float:
        """The whole-photo scan's verdict threshold (:mod:`crackscan.calibrate`): chosen on photo-sized
        mosaics of validation patches, or the patch threshold for a model without one."""
        return float(self.meta.get("scan_threshold", self.threshold))

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.meta["std"])

    @property
    def dense_head(self) -> nn.Conv2d | None:
        """The whole-photo scan's head (:mod:`crackscan.dense_head`), or None: a model trained without one,
        or an ONNX file."""
        return getattr(self.module, "dense_head", None)

    def label_for(self, probability: float, threshold: float | None = None) -> str:
        """The class name for a crack probability at the model's (or a given) threshold."""
        t = self.threshold if threshold is None else threshold
        if probability >= t:
            return self.crack_class
        others = [c for i, c in enumerate(self.classes) if i != self.crack_index]
        return others[0]

    def network(self, purpose: str) -> nn.Module:
        """The PyTorch network, or a ModelError naming what needs it when this model is an ONNX file."""
        if self.module is None:
            raise ModelError(f"{self.path}: {purpose} needs the PyTorch model (.safetensors); an exported ONNX "
                             "file only classifies patches (predict, evaluate)")
        return self.module

    def forget_graphs(self) -> None:
        """Drop the ONNX graphs exported from this model's weights, so that the next inference exports them again:
        needed after changing weights through ``.data`` (see :func:`weights_version`); other changes are seen."""
        from crackscan.scan import _WHOLE_PASS

        if self.module is not None:  # an exported ONNX file's graph is the model itself: kept
            self._onnx = self._onnx_made_from = None
            _WHOLE_PASS.pop(self.module, None)

    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        """NxHxWx3 uint8 at the input size -> normalised float batch."""
        return normalize_batch(pixels, self.mean, self.std)

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Raw logits for NxHxWx3 uint8 patches at the input size, with the PyTorch network."""
        check_patches(pixels, self.input_size)
        return self.network("the torch backend")(self.preprocess(pixels)).float().numpy()

    def crack_probability(self, pixels: np.ndarray, backend: str = "auto") -> np.ndarray:
        """Crack probabilities for NxHxWx3 uint8 patches at the input size.

        Args:
            pixels: Patches already decoded and resized (see :func:`crackscan.images.load_patch`, the eval preset).
            backend: ``"torch"``, ``"onnx"`` (ONNX Runtime) or ``"auto"`` (ONNX Runtime when installed).
        """
        if len(pixels) == 0:
            return np.zeros(0, dtype=np.float32)
        check_patches(pixels, self.input_size)
        if resolve_backend(backend) == "onnx" or (self.module is None and backend == "auto"):
            # Exported once, and again after the weights change (a library user fine-tuning a loaded model).
            made_from = None if self.module is None else weights_version(self.module)
            if self._onnx is None or made_from != self._onnx_made_from:
                from crackscan.export import OnnxRunner

                self._onnx, self._onnx_made_from = OnnxRunner.from_model(self), made_from
            run = self._onnx.logits
        else:
            run = self.logits
        # Chunks bound the activations' memory: one forward over a whole test set of 3,000 patches
        # would hold gigabytes of feature maps at once.
        logits = np.concatenate([run(pixels[i : i + INFERENCE_CHUNK]) for i in range(0, len(pixels), INFERENCE_CHUNK)])
        return softmax(logits)[:, self.crack_index]

    def predict(
        self,
        images: Iterable[ImageSource] | ImageSource,
        *,
        batch_size: int = 64,
        threshold: float | None = None,
        backend: str = "auto",
    ) -> list[Prediction]:
        """Classify images (paths, bytes or streams; one or many); an unreadable one gets a Prediction with
        ``error`` set. Decoded pixels go to :meth:`crack_probability` instead."""
        from crackscan.predict import predict_sources

        if (isinstance(images, np.ndarray) and images.dtype.kind in "biufc") or hasattr(images, "getpixel"):
            # Pixels (an array of numbers, a PIL image); an array of file names is a list of images.
            raise TypeError("predict takes image files, bytes or streams; classify decoded pixels with "
                            "crack_probability (N x S x S x 3 uint8, see crackscan.images.load_patch)")
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(images, "read"):
            images = [images]
        return list(predict_sources(self, images, batch_size=batch_size, threshold=threshold, backend=backend))

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and metadata to one ``.safetensors`` file (atomically)."""
        return save_model(path, self.network("saving"), self.meta)


def weights_version(module: nn.Module) -> tuple:
    """Changes whenever a weight tensor is replaced, added or written in place (PyTorch counts in-place writes
    per tensor, ``load_state_dict`` included): the key of graphs exported from ``module``. About 1 ms.

    Not counted: writes through a parameter's ``.data``, which PyTorch versions apart; after those, call
    :meth:`CrackModel.forget_graphs`."""
    return tuple((name, t.data_ptr(), t._version) for name, t in module.state_dict().items())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"onnx"`` when onnxruntime and onnx are importable, else ``"torch"``."""
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"unknown backend {backend!r}: use auto, torch or onnx")
    if backend != "auto":
        return backend
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    # onnx exports a model's graph, once (then it is cached): only looked for here, as importing it costs
    # ~0.25 s of every command.
    return "onnx" if importlib.util.find_spec("onnx") is not None else "torch"


def package_versions() -> dict[str, str]:
    """Versions (and the processor) that a result depends on, recorded in every model file."""
    import PIL
    import torchvision

    from crackscan import __version__

    return {
        "crackscan": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        # Training computes the frozen base's features with ONNX Runtime when it is installed.
        "onnxruntime": _installed_version("onnxruntime"),
        "python": platform.python_version(),
        # Kernels are chosen by instruction set: the same run on another processor is another run.
        "cpu": cpu_name(),
    }


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def make_meta(
    *,
    classes: Sequence[str],
    crack_index: int,
    input_size: int,
    dropout: float = 0.2,
    threshold: float = 0.5,
    **extra: Any,
) -> dict[str, Any]:
    """A metadata document with the fields :func:`load_model` requires, plus anything in ``extra``."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "num_classes": len(classes),
        "dropout": dropout,
        "classes": list(classes),
        "crack_index": int(crack_index),
        "crack_class": classes[crack_index],
        "input_size": int(input_size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "threshold": float(threshold),
        "threshold_source": "default 0.5",
        "versions": package_versions(),
    }
    meta.update(extra)
    return meta


def _umask() -> int:
    """The process's umask, without setting it: os.umask can only read it by changing it, for every thread at
    once (a file another thread creates meanwhile would get mode 0666), so it is read from /proc where Linux
    shows it, and changed and restored only where it does not."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # briefly the strictest, so a file created meanwhile is private, not open to all
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, fill: Callable[[str], None]) -> Path:
    """Have ``fill`` write a temporary file in ``path``'s folder, fsync it, then rename it to ``path``: readers
    never see half a file, and a failed write leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # said of the file asked for, not of a temporary name the user never gave
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from None
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600) and the rename keeps that; give it the mode any new file gets.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a folder in the way: said of the file asked for
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """save_file through :func:`atomic_write`: never a half-written file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_model(path: str | os.PathLike, module: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a model file: the state dict plus ``meta`` as JSON in the safetensors header."""
    return atomic_save_tensors(path, module.state_dict(), {META_KEY: json.dumps(meta)})


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a model file, without loading its weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable safetensors model file ({err})") from None
    if META_KEY not in header:
        raise ModelError(f"{path}: no crackscan metadata: a plain state dict is not a crackscan model")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: crackscan metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: crackscan metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def _check_meta(path: str, meta: dict[str, Any]) -> None:
    required = ("architecture", "classes", "crack_index", "input_size", "mean", "std")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ModelError(f"{path}: metadata lacks {', '.join(missing)}")
    try:
        version, crack_index, size = int(meta.get("format_version", 1)), int(meta["crack_index"]), int(meta["input_size"])
        threshold = float(meta.get("threshold", 0.5))
        scan_threshold = float(meta.get("scan_threshold", threshold))
        mean, std = [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
    except (TypeError, ValueError):
        raise ModelError(
            f"{path}: malformed metadata: format_version, crack_index and input_size must be integers, "
            "threshold and scan_threshold numbers, mean and std lists of numbers"
        ) from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelError(f"{path}: mean and std must hold 3 numbers each, std above 0")
    if version > FORMAT_VERSION:
        raise ModelError(f"{path}: written by a newer crackscan (format {meta['format_version']}); upgrade")
    if meta["architecture"] != ARCHITECTURE:
        raise ModelError(f"{path}: architecture {meta['architecture']!r} is not {ARCHITECTURE!r}")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise ModelError(f"{path}: metadata must name at least two classes")
    if not 0 <= crack_index < len(classes):
        raise ModelError(f"{path}: crack_index {meta['crack_index']} is outside the {len(classes)} classes")
    if size not in INPUT_SIZES:
        raise ModelError(f"{path}: input_size {size} is outside {INPUT_SIZES.start}..{INPUT_SIZES.stop - 1}")
    if not 0.0 <= threshold <= 1.0:
        raise ModelError(f"{path}: threshold must lie in [0, 1]")
    if not 0.0 <= scan_threshold <= 1.0:
        raise ModelError(f"{path}: scan_threshold must lie in [0, 1]")


def default_model_path() -> Path:
    """The model shipped inside the package."""
    return Path(str(resources.files("crackscan") / "weights" / SHIPPED_MODEL))


def is_shipped_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the model shipped inside the package: read, never written (nor written beside)."""
    return Path(path).resolve() == default_model_path().resolve()


def load_model(path: str | os.PathLike | None = None) -> CrackModel:
    """Load a crackscan model file (the shipped model when ``path`` is None).

    ``.safetensors`` files (and run folders) give the PyTorch network, which every command can use.
    ``.onnx`` files from ``crackscan export`` (fp32 or int8) classify patches with ONNX Runtime:
    ``predict``, ``evaluate`` and :meth:`CrackModel.crack_probability` work; ``scan``, ``explain`` and
    ``export`` need the network and say so.

    Raises:
        ModelError: The file is missing, not a crackscan model, or its tensors don't fit its metadata.
    """
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.is_file():
            raise ModelError(f"{path}: a folder without model.safetensors (is it a training run folder?)")
        path = candidate
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        # An exported model (e.g. `crackscan export --int8`): its metadata travels inside the file.
        from crackscan.export import OnnxRunner

        runner = OnnxRunner.from_file(path)
        return CrackModel(module=None, meta=runner.meta, path=str(path), _onnx=runner)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: crackscan models are .safetensors files, or .onnx files written by "
                         "`crackscan export` (no pickle is ever loaded)")
    meta = read_meta(path)
    _check_meta(str(path), meta)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{path}: cannot read tensors ({err})") from None
    # Models trained before the dense head (or with --dense-mosaics 0) have none: scan then uses the
    # classifier's own head at every cell.
    dense = state.get(DENSE_HEAD_WEIGHT)
    kernel = int(dense.shape[-1]) if dense is not None and dense.ndim == 4 else 0
    if dense is not None and (not kernel or tuple(dense.shape) != (1, FEATURE_DIM, kernel, kernel)
                              or kernel != dense_kernel(int(meta["input_size"]))):
        raise ModelError(f"{path}: tensor {DENSE_HEAD_WEIGHT} has shape {tuple(dense.shape)}, expected "
                         f"(1, {FEATURE_DIM}, k, k) with k = {dense_kernel(int(meta['input_size']))} "
                         f"for input size {meta['input_size']}")
    module = build_model(num_classes=len(meta["classes"]), dropout=float(meta.get("dropout", 0.2)),
                         dense_head=kernel)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{path}: tensors do not match a {meta['architecture']} with {len(meta['classes'])} classes "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"{path}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)} "
            f"for the metadata's {len(meta['classes'])} classes"
        )
    module.load_state_dict(state)
    module.eval().to(memory_format=torch.channels_last)
    return CrackModel(module=module, meta=meta, path=str(path))

