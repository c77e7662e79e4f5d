"""Decoding image files into RGB, the one way every command reads pixels.

Every reader in crackscan (training, evaluation, prediction, scanning, the web service) goes through
:func:`load_image`, so a file is either decoded the same way everywhere or refused everywhere with the
same one-line reason. Patch readers (training, evaluation, prediction, export, explain, the service's
``/predict``) call :func:`load_patch`, which takes a faster route to the same pixels for plain JPEGs
(:func:`_plain_jpeg`) and falls back to :func:`load_image` for everything else.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

try:  # libjpeg-turbo without PIL's Python-side parsing (see _plain_jpeg); PIL gives the same pixels, slower
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheels
    simplejpeg = None

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

#: File suffixes treated as images when a folder is searched.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

#: Largest image accepted, in pixels. A 50-MP photo passes; a header claiming 60000x60000 does not.
MAX_PIXELS = 120_000_000
#: Largest image file read (a 120-MP 16-bit TIFF is under 0.8 GB uncompressed).
MAX_FILE_BYTES = 1_000_000_000

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
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", "<stream>")


def is_image_path(path: Path) -> bool:
    """Whether a path's suffix marks it as an image crackscan reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, or an ImageError saying in plain words why they cannot be read."""
    path = Path(path)
    name = str(path)
    try:  # looking at the path needs search permission on its folder
        if path.is_symlink() and not path.exists():
            raise ImageError(name, "broken symbolic link")
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):  # a folder crackscan was asked to search and could not
                raise ImageError(name, "folder cannot be searched (permission denied)")
            raise ImageError(name, "is a folder, not an image file")
        if not path.exists():
            raise ImageError(name, "no such file")
        if not path.is_file():  # a pipe would block the batch forever, a device would fill the memory
            raise ImageError(name, "not a regular file (a pipe, socket or device)")
    except PermissionError:
        raise ImageError(name, "permission denied (its folder cannot be searched)") from None
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(name, f"refused: {size / 1e9:.1f} GB, over the {MAX_FILE_BYTES / 1e9:.0f}-GB limit of "
                                   "an image file")
        return path.read_bytes()
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as err:
        raise ImageError(name, f"cannot read file ({err.strerror or err})") from None


def read_source(source: ImageSource, name: str) -> bytes:
    """The bytes of a path, bytes or stream, or an ImageError (unreadable or empty) naming ``name``."""
    if isinstance(source, (str, os.PathLike)):
        data = read_bytes(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read()
    else:
        raise TypeError(f"an image source is a path, bytes or a binary stream, not {type(source).__name__}")
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    return data


#: How to turn an image upright for each EXIF orientation (tag 0x0112) but 1, upright already. 5-8 swap the axes.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (upright) when it has none or an unusable one: a tag stored as text, a
    value outside 1-8 or damaged EXIF data turn no photo away."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # damaged EXIF: Pillow's parser raises whatever its reading of the bytes hits
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def oriented_size(data: bytes, *, cheap: bool = False) -> tuple[int, int] | None:
    """An image's ``(width, height)`` after EXIF rotation; None when the header is unusable.

    A JPEG's orientation is read from its header. Pillow reports a TIFF's size upright already (and turns its
    pixels when loading). A PNG or WebP may keep its EXIF after the pixels, which Pillow decodes to find it:
    ``cheap`` skips that and gives the stored size (which has the same longest side).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            turn = 1 if image.format == "TIFF" or (cheap and image.format != "JPEG") else orientation(image)
    except Exception:  # load_image will decode it again and say why in its own words
        return None
    return (height, width) if turn >= 5 else (width, height)


def _open(source: ImageSource, name: str, max_pixels: int) -> Image.Image:
    data = read_source(source, name)
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:  # Pillow refuses a header over twice its own limit itself
        found = re.search(r"\((\d+) pixels\)", str(err))
        claimed = f"{int(found.group(1)) / 1e6:.0f} MP, " if found else ""
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))  # whichever refused it
        raise ImageError(name, f"refused: image too large ({claimed}over the {limit / 1e6:.0f}-MP limit)") from None
    except Exception as err:  # a format plugin may raise anything (NotImplementedError for some DDS files)
        raise ImageError(name, f"cannot decode ({str(err) or type(err).__name__})") from None


#: Rows converted at a time from 16-bit and float images.
_BAND_ROWS = 256


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling 16-bit and float data instead of clipping it."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image)
        top = float(array.max(initial=0))
        if image.mode == "F" and top <= 1.0:  # floating-point data scaled to [0, 1], as scientific TIFFs are
            high = 1.0
        else:
            high = 65535.0 if image.mode.startswith("I;16") or top > 255 else 255.0
        # In bands of rows: float copies of a whole 100-MP image would take gigabytes for a 200-KB upload.
        gray = np.empty(array.shape, dtype=np.uint8)
        for start in range(0, array.shape[0], _BAND_ROWS):
            band = array[start:start + _BAND_ROWS].astype(np.float64)
            band *= 255.0 / high
            band += 0.5
            np.clip(band, 0, 255, out=band)
            gray[start:start + _BAND_ROWS] = band  # truncates, after the + 0.5: rounds
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
    image = _open(source, name, max_pixels)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(name, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            name, f"refused: {width}x{height} is {width * height / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f}-MP limit"
        )
    # The orientation is read after the pixels: for a PNG, reading it may load them, and a failure then would be
    # swallowed (the EXIF is optional) and leave a half-decoded image that load() no longer complains about; a
    # TIFF is turned upright by Pillow itself while loading, which removes its tag. A JPEG's is read first, from
    # its header, for a reduced decode of the right shape.
    turn = orientation(image) if reduce_to is not None and image.format == "JPEG" else None
    try:
        if turn is not None:
            # Orientation 5-8 swap the axes, so ask the decoder for the transposed size.
            w, h = reduce_to if turn < 5 else reduce_to[::-1]
            image.draft("RGB", (max(1, int(w)), max(1, int(h))))
        # The size was checked above; Pillow's own DecompressionBombWarning (over 89 MP) is not made an error
        # here, as warnings.catch_warnings would change the filters of every thread in the process.
        image.load()
        if turn is None:
            turn = orientation(image)
        if turn != 1:
            image = image.transpose(_UPRIGHT[turn])
        return _to_rgb(image)
    except Exception as err:  # any decoder failure is this file's, never the batch's
        reason = str(err) or type(err).__name__
        if "truncated" in reason.lower() or "image file is truncated" in reason:
            raise ImageError(name, "truncated or damaged image data") from None
        raise ImageError(name, f"cannot decode ({reason})") from None


#: PyTorch's uint8 antialiased resize is a port of PIL's with AVX2 intrinsics. Under any other CPU
#: capability (AVX-512 included) it runs a generic kernel, slower than PIL's and threaded with OpenMP,
#: so PIL resizes there.
TORCH_RESIZE = torch.backends.cpu.get_cpu_capability() == "AVX2"


def resize_rgb(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize HxWx3 uint8 pixels to ``size`` x ``size``: bilinear with antialiasing.

    PyTorch's AVX2 kernel for this is a port of PIL's (results within one level of ``Image.resize``;
    a few percent of the values differ by one) and takes half its time on a 114-px patch (0.07 vs
    0.13-0.15 ms), which counts when the network classifies a patch in under a millisecond. The result
    is then an HxWx3 view of the kernel's planar output: making it contiguous would cost another
    0.05 ms, and ``np.stack`` copies it into a batch as fast either way.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 pixels, got {pixels.dtype} of shape {pixels.shape}")
    if pixels.shape[:2] == (size, size):
        return pixels
    if not TORCH_RESIZE:
        resized = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(resized)
    if not (pixels.flags.writeable and pixels.flags.c_contiguous):
        pixels = pixels.copy()  # torch.from_numpy refuses negative strides and warns about read-only arrays
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # a channels-last view: the fast kernel's layout
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).numpy()


#: Byte strings that send a JPEG to PIL: orientation metadata (EXIF's APP1 header, XMP's tiff:Orientation),
#: and multi-picture files (MPO), which PIL opens as their own format and never decodes at a reduced scale.
_PIL_ONLY_MARKS = (b"Exif\x00\x00", b"Orientation", b"MPF\x00")


def _plain_jpeg(data: bytes, size: int, max_pixels: int) -> np.ndarray | None:
    """``load_image(data, reduce_to=(size, size))`` for a plain JPEG (no orientation, one picture), or None.

    A patch is decoded by libjpeg-turbo either way; simplejpeg calls it without PIL's Python-side header
    and EXIF parsing (0.14 ms instead of ~0.3 ms for a 227-px patch). The DCT scale is the one PIL's
    ``draft`` picks, and the pixels are PIL's exactly (tested). Anything unusual (orientation metadata,
    a multi-picture file, CMYK, a size over the limit, a decoder complaint) returns None, and the caller
    takes PIL's path, which decodes it or says what is wrong.
    """
    if simplejpeg is None or not data.startswith(b"\xff\xd8") or any(mark in data for mark in _PIL_ONLY_MARKS):
        return None
    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
        if colour not in ("YCbCr", "Gray") or not 0 < width * height <= max_pixels:
            return None
        scale = min(width // size, height // size)
        factor = next((s for s in (8, 4, 2) if scale >= s), 1)  # as JpegImageFile.draft chooses
        shape = (-(-height // factor), -(-width // factor))
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=factor,
                                        min_height=shape[0], min_width=shape[1])
    except Exception:  # whatever simplejpeg objects to, PIL's path decodes it or names the problem
        return None
    return pixels if pixels.shape[:2] == shape else None


def load_patch(source: ImageSource, size: int, name: str | None = None) -> np.ndarray:
    """Decode an image and bring it to the model's input size: the eval preset's pixel half."""
    name = name or describe(source)
    data = read_source(source, name)
    pixels = _plain_jpeg(data, size, MAX_PIXELS)
    if pixels is None:
        pixels = np.asarray(load_image(data, reduce_to=(size, size), name=name))
    return resize_rgb(pixels, size)
