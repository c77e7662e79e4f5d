"""Decoding image files into RGB, the one way every command reads pixels.

Every reader in crackscan (training, evaluation, prediction, scanning, the web service) goes through
:func:`load_image`, so a file is either decoded the same way everywhere or refused everywhere with the
same one-line reason.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]

#: File suffixes treated as images when a folder is searched.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

#: Largest image accepted, in pixels. A 50-MP photo passes; a header claiming 60000x60000 does not.
MAX_PIXELS = 120_000_000

# Truncated files must fail loudly rather than decode into grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """A file that cannot be used as an image; ``str()`` is a one-line reason naming the file."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def describe(source: ImageSource) -> str:
    """A short name for an image source, for messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", "<stream>")


def is_image_path(path: Path) -> bool:
    """Whether a path's suffix marks it as an image crackscan reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, or an ImageError saying in plain words why they cannot be read."""
    path = Path(path)
    name = str(path)
    if path.is_symlink() and not path.exists():
        raise ImageError(name, "broken symbolic link")
    if path.is_dir():
        raise ImageError(name, "is a folder, not an image file")
    if not path.exists():
        raise ImageError(name, "no such file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as err:
        raise ImageError(name, f"cannot read file ({err.strerror or err})") from None


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        data = read_bytes(source)
    elif isinstance(source, bytes):
        data = source
    else:
        data = source.read()
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(name, f"refused: image too large ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(name, f"cannot decode ({err})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling 16-bit and float data instead of clipping it."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        gray = np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are composited on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    reduce_to: tuple[int, int] | None = None,
    max_pixels: int = MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode an image into 8-bit RGB with its EXIF orientation applied.

    Args:
        source: A path, the file's bytes, or a binary stream.
        reduce_to: Optional ``(width, height)`` the caller will resize to. JPEGs are then decoded at the
            smallest DCT scale (1/2, 1/4, 1/8) that still covers it, which is several times faster for
            big photos and gives the same pixels in every command that uses it.
        max_pixels: Images larger than this are refused (decompression-bomb guard).
        name: How to call the source in error messages (default: its path).

    Returns:
        A loaded RGB ``PIL.Image``. Animated or multi-page files give their first frame.

    Raises:
        ImageError: The file is missing, unreadable, not an image, truncated or too large.
    """
    name = name or describe(source)
    image = _open(source, name)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(name, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            name, f"refused: {width}x{height} is {width * height / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f}-MP limit"
        )
    try:
        if reduce_to is not None and image.format == "JPEG":
            # Orientation 5-8 swap the axes, so ask the decoder for the transposed size.
            orientation = image.getexif().get(0x0112, 1)
            w, h = reduce_to if orientation < 5 else reduce_to[::-1]
            image.draft("RGB", (max(1, int(w)), max(1, int(h))))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower() or "image file is truncated" in reason:
            raise ImageError(name, "truncated or damaged image data") from None
        raise ImageError(name, f"cannot decode ({reason})") from None


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` with antialiasing; returns an HxWx3 uint8 array."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def load_patch(source: ImageSource, size: int, name: str | None = None) -> np.ndarray:
    """Decode an image and bring it to the model's input size: the eval preset's pixel half."""
    return resize_rgb(load_image(source, reduce_to=(size, size), name=name), size)
