"""Property tests of the one decode path: whatever bytes arrive, load_image gives RGB or an ImageError.

Random bytes, and valid JPEG/PNG/GIF/TIFF files with bytes flipped, cut, inserted or header fields
rewritten: the decoder must never crash, hang, or return anything but an 8-bit RGB image.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from crackscan.images import ImageError, load_image, load_patch

SETTINGS = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _sample(fmt: str, mode: str = "RGB", **kwargs) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


SAMPLES = {
    "jpeg": _sample("JPEG", quality=90),
    "progressive-jpeg": _sample("JPEG", quality=90, progressive=True),
    "png": _sample("PNG"),
    "png-rgba": _sample("PNG", mode="RGBA"),
    "gif": _sample("GIF", mode="P"),
    "tiff": _sample("TIFF"),
    "bmp": _sample("BMP"),
    "webp": _sample("WEBP"),
}


def check(data: bytes, reduce_to: tuple[int, int] | None = None) -> None:
    """The property: an RGB image of positive size, or an ImageError with a one-line message."""
    try:
        image = load_image(data, reduce_to=reduce_to, name="sample")
    except ImageError as err:
        message = str(err)
        assert message.startswith("sample: ") and "\n" not in message
        return
    assert image.mode == "RGB" and image.size[0] >= 1 and image.size[1] >= 1
    assert np.asarray(image).dtype == np.uint8


@given(st.binary(max_size=4096))
@SETTINGS
def test_random_bytes_never_crash(data):
    check(data)


@st.composite
def mutated(draw):
    """A valid file with a few random edits: overwrite, truncate, insert or delete bytes."""
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["overwrite", "header", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "overwrite":
            data[at] = draw(st.integers(0, 255))
        elif kind == "header":  # where sizes, lengths and markers live
            head = draw(st.integers(0, min(64, len(data) - 1)))
            data[head] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif kind == "truncate":
            del data[max(1, at):]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        if not data:
            break
    return bytes(data)


@given(mutated(), st.sampled_from([None, (16, 16), (64, 64)]))
@SETTINGS
def test_mutated_images_never_crash(data, reduce_to):
    check(data, reduce_to)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_unmutated_samples_decode(name):
    # The property above would be vacuous if the samples themselves failed to decode.
    assert load_patch(SAMPLES[name], 32).shape == (32, 32, 3)
