"""crackscan: find cracks in photos of concrete with a MobileNetV2 transfer-learning classifier.

A decision aid: its output never replaces a professional structural assessment.

The names below are imported on first use (PEP 562), so that ``import crackscan.cli`` and
``crackscan --help`` do not pay for PyTorch and torchvision (~5 s on 2 cores) before they are needed.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

_EXPORTS = {
    "ImageError": "crackscan.images",
    "load_image": "crackscan.images",
    "CrackModel": "crackscan.model",
    "ModelError": "crackscan.model",
    "Prediction": "crackscan.model",
    "load_model": "crackscan.model",
}

__all__ = ["CrackModel", "ImageError", "ModelError", "Prediction", "__version__", "load_image", "load_model"]

if _typing.TYPE_CHECKING:
    from crackscan.images import ImageError, load_image
    from crackscan.model import CrackModel, ModelError, Prediction, load_model


def __getattr__(name: str) -> _typing.Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'crackscan' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})
