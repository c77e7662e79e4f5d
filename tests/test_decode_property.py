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

from crackscan import images
from crackscan.images import MAX_PIXELS, ImageError, load_image, load_patch, resize_rgb

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


# ---------------------------------------------------------------------------------------------------
# The fast JPEG path (simplejpeg) must be PIL's path, only faster: same pixels, same refusals.


def _jpeg(width: int, height: int, mode: str = "RGB", **kwargs) -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _pil_patch(data: bytes, size: int) -> np.ndarray:
    """load_patch as it was before the fast path: PIL decodes (with its DCT draft), then the same resize."""
    return resize_rgb(np.array(load_image(data, reduce_to=(size, size), name="sample")), size)


@pytest.mark.parametrize("width,height,size", [(227, 227, 96), (227, 227, 112), (227, 227, 227), (500, 333, 64),
                                               (1000, 777, 96), (60, 40, 96), (800, 90, 96), (96, 193, 48)])
@pytest.mark.parametrize("variant", ["baseline", "progressive", "gray", "444"])
def test_plain_jpeg_path_gives_pils_pixels(width, height, size, variant):
    kwargs = {"progressive": {"progressive": True}, "444": {"subsampling": 0}}.get(variant, {})
    data = _jpeg(width, height, "L" if variant == "gray" else "RGB", **kwargs)
    fast = images._plain_jpeg(data, size, MAX_PIXELS)
    assert fast is not None, "a plain JPEG must take the fast path"
    np.testing.assert_array_equal(fast, np.asarray(load_image(data, reduce_to=(size, size))))
    np.testing.assert_array_equal(load_patch(data, size), _pil_patch(data, size))


def test_orientation_metadata_takes_pils_path():
    image = Image.fromarray(np.zeros((40, 120, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    assert images._plain_jpeg(buffer.getvalue(), 32, MAX_PIXELS) is None
    assert load_patch(buffer.getvalue(), 32).shape == (32, 32, 3)
    assert load_image(buffer.getvalue()).size == (40, 120)  # turned, which only PIL's path does


def test_multi_picture_files_take_pils_path():
    # PIL opens MPO files as their own format and does not decode them at a reduced DCT scale.
    frames = [Image.fromarray(np.full((300, 400, 3), v, dtype=np.uint8)) for v in (60, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "MPO", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert images._plain_jpeg(data, 32, MAX_PIXELS) is None
    np.testing.assert_array_equal(load_patch(data, 32), _pil_patch(data, 32))


def test_resize_refuses_what_is_not_rgb_uint8():
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            resize_rgb(bad, 4)
    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    flipped = pixels[:, ::-1]  # negative strides, which torch.from_numpy refuses
    np.testing.assert_array_equal(resize_rgb(flipped, 8), resize_rgb(np.ascontiguousarray(flipped), 8))


def test_fast_path_respects_the_pixel_limit():
    data = _jpeg(300, 200)
    assert images._plain_jpeg(data, 32, MAX_PIXELS) is not None
    assert images._plain_jpeg(data, 32, 300 * 200 - 1) is None


LARGE_JPEGS = {"jpeg": _jpeg(120, 100), "progressive-jpeg": _jpeg(120, 100, progressive=True)}


@st.composite
def mutated_jpeg(draw):
    data = bytearray(LARGE_JPEGS[draw(st.sampled_from(sorted(LARGE_JPEGS)))])
    for _ in range(draw(st.integers(1, 3))):
        if len(data) < 8:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["overwrite", "header", "scan", "truncate", "delete"]))
        if kind == "scan":  # the entropy-coded data: headers stay intact, so the fast path decodes it
            data[draw(st.integers(len(data) // 2, len(data) - 3))] = draw(st.integers(0, 255))
        elif kind == "overwrite":
            data[at] = draw(st.integers(0, 255))
        elif kind == "header":
            data[draw(st.integers(0, min(200, len(data) - 1)))] = draw(
                st.sampled_from([0x00, 0xFF, 0x7F, draw(st.integers(0, 255))]))
        elif kind == "truncate":
            del data[max(1, at):]
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


@given(mutated_jpeg())
@SETTINGS
def test_damaged_jpegs_decode_or_fail_as_pil_does(data):
    try:
        expected = _pil_patch(data, 32)
    except ImageError as err:
        with pytest.raises(ImageError) as caught:
            load_patch(data, 32, name="sample")
        assert str(caught.value) == str(err)
        return
    np.testing.assert_array_equal(load_patch(data, 32, name="sample"), expected)


@given(st.integers(8, 300), st.integers(8, 300), st.integers(8, 128))
@settings(max_examples=40, deadline=None, derandomize=True)
def test_resize_is_pils_within_one_level(width, height, size):
    pixels = np.random.default_rng(width + height + size).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = resize_rgb(pixels, size)
    pil = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - pil).max() <= 1
