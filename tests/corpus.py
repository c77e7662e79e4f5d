"""A hostile corpus: the broken and odd files an inspector's folders really hold, generated on the spot.

Every entry says whether crackscan must *use* it (a decodable oddity: alpha, 16-bit, CMYK, animated...)
or *report* it (a broken file), and which words the one-line report must contain. The files are tiny:
the decompression bombs are crafted headers that claim 60000x60000 pixels in a few hundred bytes.

Run ``python tests/corpus.py FOLDER`` to write one for trying the CLI by hand.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: The 16-bit grey used by ``gray16.png`` and ``rgb16.png``: 0x8080 / 65535 * 255 = 128.0 exactly.
MID_GREY_16 = 0x8080
#: Stored size of the EXIF-rotated JPEG; orientation 6 means a viewer shows it 24 wide, 40 high.
EXIF_STORED_SIZE = (40, 24)
BOMB_SIDE = 60000
#: A file name that is not valid UTF-8 (Latin-1 "é"), as old cameras and network shares produce. Only
#: Linux file systems accept such names; elsewhere the entry is left out.
LATIN1_NAME = os.fsdecode(b"latin1-b\xe9ton.jpg") if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class Entry:
    """One corpus file and what crackscan must do with it.

    Attributes:
        name: Path relative to the corpus folder.
        what: What the file is, for test ids and messages.
        ok: True when the file must be decoded and predicted; False when it must be reported.
        reason: For a bad file, a lower-case fragment its error message must contain.
        has_bytes: Whether the entry has file content that can be uploaded (not a link, folder or
            permission case).
    """

    name: str
    what: str
    ok: bool
    reason: str = ""
    has_bytes: bool = True


def _noise(size: tuple[int, int], seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(60, 200, shape, dtype=np.uint8)


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand, so the header can say anything (16-bit RGB, a 60000x60000 claim)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw_rows))
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid-looking PNG whose IHDR claims ``side`` x ``side`` RGB pixels, with one tiny IDAT."""
    return png_bytes(side, side, 8, 2, b"\x00" + b"\x80" * 30)


def jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A real 16x16 JPEG whose SOF0 frame header is patched to claim ``side`` x ``side`` pixels."""
    data = bytearray(_jpeg(Image.fromarray(_noise((16, 16), 1))))
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "baseline JPEG without SOF0"
    # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", data, sof + 5, side, side)
    return bytes(data)


def _dark_left_edge() -> Image.Image:
    """Noise stored 40x24 with a dark left edge, so that a rotation's direction shows."""
    pixels = _noise(EXIF_STORED_SIZE, 2)
    pixels[:, :8] = 0
    return Image.fromarray(pixels)


def exif_rotated_jpeg() -> bytes:
    """A JPEG stored 40x24 with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(_dark_left_edge(), exif=exif.tobytes())


def damaged_exif_jpeg() -> bytes:
    """The EXIF-rotated JPEG with its EXIF block overwritten: the pixels are fine, the metadata is not."""
    data = bytearray(exif_rotated_jpeg())
    start = data.find(b"Exif\x00\x00") + 14  # past the TIFF header, into the tag directory
    data[start : start + 16] = b"\xff" * 16
    return bytes(data)


def odd_exif_jpeg(tags: list[tuple[int, int, bytes]]) -> bytes:
    """The EXIF-rotated JPEG's pixels with a hand-made EXIF block: ``(tag, TIFF type, 4-byte value)``
    entries, e.g. an orientation stored as text (type 2), which Pillow hands back as a string."""
    entries = b"".join(struct.pack(">HHI", tag, kind, 2 if kind == 2 else 1) + value for tag, kind, value in tags)
    tiff = b"MM\x00*" + struct.pack(">IH", 8, len(tags)) + entries + struct.pack(">I", 0)
    return _jpeg(_dark_left_edge(), exif=b"Exif\x00\x00" + tiff)


def flipped_byte(png: bytes) -> bytes:
    """``png`` with a byte inside its compressed pixel data inverted: whole, but undecodable."""
    data = bytearray(png)
    data[png.find(b"IDAT") + 4 + 200] ^= 0xFF
    return bytes(data)


def unsupported_dds() -> bytes:
    """A DDS header (a format Pillow knows) with a pixel format its decoder does not: NotImplementedError."""
    header = struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + b"\0" * 44
    header += struct.pack("<2I4s5I", 32, 4, b"ZZZZ", 0, 0, 0, 0, 0) + b"\0" * 20
    return b"DDS " + header + b"\0" * (64 * 64 * 4)


def animated_gif() -> bytes:
    frames = [Image.fromarray(_noise((32, 32), 10 + i)).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def multipage_tiff() -> bytes:
    pages = [Image.fromarray(_noise((32, 32), 20 + i)) for i in range(3)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def printable(name: str) -> str:
    """How crackscan's reports spell a file name that may not be valid UTF-8 (see crackscan.data)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def good_files() -> dict[str, tuple[str, bytes]]:
    """Decodable oddities: name -> (what, bytes). Every one must be predicted, none reported."""
    rgb = _noise((48, 48), 3)
    alpha = np.dstack([rgb, np.linspace(0, 255, 48 * 48).reshape(48, 48).astype(np.uint8)])
    gray16 = np.full((32, 32), MID_GREY_16, dtype=np.uint16)
    rgb16_rows = b"".join(b"\x00" + struct.pack(">H", MID_GREY_16) * 3 * 16 for _ in range(16))
    files = {
        "plain.jpg": ("an ordinary RGB JPEG", _jpeg(Image.fromarray(rgb))),
        "alpha.png": ("PNG with an alpha channel", _encode(Image.fromarray(alpha, "RGBA"), "PNG")),
        "gray16.png": ("16-bit grayscale PNG", _encode(Image.fromarray(gray16), "PNG")),
        "rgb16.png": ("16-bit RGB PNG", png_bytes(16, 16, 16, 2, rgb16_rows)),
        "gray.jpg": ("grayscale JPEG", _jpeg(Image.fromarray(_noise((48, 48), 4, channels=1), "L"))),
        "palette.png": ("palette PNG", _encode(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
        "cmyk.jpg": ("CMYK JPEG", _jpeg(Image.fromarray(rgb).convert("CMYK"))),
        "one-pixel.png": ("a 1x1 image", _encode(Image.new("RGB", (1, 1), (120, 130, 140)), "PNG")),
        "one-pixel.jpg": ("a 1x1 JPEG", _jpeg(Image.new("RGB", (1, 1), (120, 130, 140)))),
        "animated.gif": ("animated GIF (3 frames)", animated_gif()),
        "multipage.tif": ("multi-page TIFF (3 pages)", multipage_tiff()),
        "exif-rotated.jpg": ("JPEG with EXIF orientation 6", exif_rotated_jpeg()),
        "damaged-exif.jpg": ("JPEG with a damaged EXIF block", damaged_exif_jpeg()),
        "exif-orientation-text.jpg": ("JPEG whose EXIF orientation is text, not a number",
                                      odd_exif_jpeg([(0x0112, 2, b"6\x00\x00\x00")])),
        "exif-odd-tag.jpg": ("JPEG with EXIF orientation 6 and a size tag stored as text",
                             odd_exif_jpeg([(0x0101, 2, b"9\x00\x00\x00"), (0x0112, 3, b"\x00\x06\x00\x00")])),
        "UPPER CASE.JPG": ("upper-case suffix and a space", _jpeg(Image.fromarray(_noise((40, 40), 5)))),
        "crack photo 2 (copy).jpg": ("spaces and brackets in the name", _jpeg(Image.fromarray(_noise((40, 40), 6)))),
        "fissure béton ü 写真.jpg": ("non-ASCII name", _jpeg(Image.fromarray(_noise((40, 40), 7)))),
    }
    if LATIN1_NAME:
        files[LATIN1_NAME] = ("a name that is not valid UTF-8", _jpeg(Image.fromarray(_noise((40, 40), 12))))
    return files


def bad_files() -> dict[str, tuple[str, str, bytes]]:
    """Broken files with content: name -> (what, reason fragment, bytes)."""
    whole = _jpeg(Image.fromarray(_noise((96, 96), 8)))
    png = _encode(Image.fromarray(_noise((64, 64), 9)), "PNG")
    return {
        "empty.jpg": ("zero-byte file", "empty", b""),
        "truncated.jpg": ("JPEG cut in half", "truncated", whole[: len(whole) // 2]),
        "truncated.png": ("PNG cut in half", "truncated", png[: len(png) // 2]),
        "damaged.png": ("PNG with one byte of its pixel data flipped", "cannot decode", flipped_byte(png)),
        "notes.jpg": ("a text file named .jpg", "not an image", "Inspection notes: wall B, 3rd floor.\n".encode() * 20),
        "bomb.png": ("PNG header claiming 60000x60000", "too large", png_bomb()),
        "bomb.jpg": ("JPEG header claiming 60000x60000", "too large", jpeg_bomb()),
        "unsupported.jpg": ("DDS file with a pixel format Pillow cannot decode", "cannot decode", unsupported_dds()),
    }


def corpus_entries(*, unreadable: bool = True) -> list[Entry]:
    """What :func:`build_corpus` writes, without writing it (for parametrizing tests)."""
    entries = [Entry(name, what, ok=True) for name, (what, _) in good_files().items()]
    entries += [Entry(name, what, ok=False, reason=reason) for name, (what, reason, _) in bad_files().items()]
    entries.append(Entry("broken-link.jpg", "broken symbolic link", ok=False, reason="broken symbolic link", has_bytes=False))
    entries.append(Entry("x.jpg", "a folder named x.jpg", ok=False, reason="folder", has_bytes=False))
    if unreadable:
        entries.append(Entry("unreadable.jpg", "no read permission", ok=False, reason="permission denied", has_bytes=False))
    return entries


def build_corpus(folder: str | os.PathLike, *, unreadable: bool = True) -> list[Entry]:
    """Write the hostile corpus into ``folder`` (created) and return what each entry must give.

    Args:
        folder: Where to write; it should be empty.
        unreadable: Also write ``unreadable.jpg`` with mode 000. Whether the reader is really refused
            depends on who runs it (root is not): see :func:`permission_is_enforced`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (_, data) in good_files().items():
        (folder / name).write_bytes(data)
    for name, (_, _, data) in bad_files().items():
        (folder / name).write_bytes(data)
    (folder / "broken-link.jpg").symlink_to(folder / "does-not-exist.jpg")
    (folder / "x.jpg").mkdir()
    if unreadable:
        path = folder / "unreadable.jpg"
        path.write_bytes(_jpeg(Image.fromarray(_noise((40, 40), 11))))
        path.chmod(0)
    return corpus_entries(unreadable=unreadable)


def drop_privileges_prefix() -> list[str]:
    """A command prefix that makes file permissions bind even for root, or ``[]`` when none works.

    Root reads mode-000 files because it holds CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; ``setpriv``
    runs the command without them, as an ordinary user would be, while it still owns every other file.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    try:  # containers without CAP_SETPCAP refuse to change the bounding set
        ok = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else []


def permission_is_enforced(path: str | os.PathLike, prefix: list[str]) -> bool:
    """Whether a process started with ``prefix`` is refused reading ``path`` (a mode-000 file)."""
    probe = (
        "import sys\n"
        "try:\n    open(sys.argv[1], 'rb').close()\nexcept PermissionError:\n    print('denied')\n"
    )
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.stdout.strip() == "denied"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus.py FOLDER")
    for entry in build_corpus(sys.argv[1]):
        print(f"{'use   ' if entry.ok else 'report'}  {entry.name:<28} {entry.what}")
