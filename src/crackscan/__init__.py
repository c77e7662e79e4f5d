"""crackscan: find cracks in photos of concrete with a MobileNetV2 transfer-learning classifier.

A decision aid: its output never replaces a professional structural assessment.
"""

__version__ = "0.1.0"

from crackscan.images import ImageError, load_image  # noqa: E402
from crackscan.model import CrackModel, ModelError, Prediction, load_model  # noqa: E402

__all__ = ["CrackModel", "ImageError", "ModelError", "Prediction", "__version__", "load_image", "load_model"]
