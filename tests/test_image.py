"""Tests for valora_jax.image: loading sources, CLIP-style resize/crop/normalise, errors."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from valora_jax.image import CLIP_MEAN, CLIP_STD, load_image, preprocess, preprocess_batch

RED, BLUE = (200, 30, 10), (10, 40, 220)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _uniform(h: int, w: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def _expected(rgb) -> np.ndarray:
    c = np.array(rgb, np.float32) / np.float32(255.0)
    return (c - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)


def _png_header(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_uniform_colour_normalisation_exact():
    out = preprocess(_uniform(37, 53, RED), size=16, mean=CLIP_MEAN, std=CLIP_STD)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.broadcast_to(_expected(RED), out.shape))


def test_zero_mean_unit_std_is_plain_scaling():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = preprocess(arr, size=8, mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_array_equal(out, arr.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("resample", ["bicubic", "nearest", "bilinear"])
@pytest.mark.parametrize("wide", [True, False])
def test_aspect_keeps_centre(wide, resample):
    # 400x100 (or 100x400): a red band in the centre, wider than the crop, blue edges.
    arr = _uniform(100, 400, BLUE)
    arr[:, 140:260] = RED
    if not wide:
        arr = arr.transpose(1, 0, 2).copy()
    out = preprocess(arr, size=50, mean=CLIP_MEAN, std=CLIP_STD, resample=resample)
    assert out.shape == (50, 50, 3)
    # a squash (no crop) would keep the blue edges; a crop keeps only the red centre
    tol = 1.5 / 255 / min(CLIP_STD)
    np.testing.assert_allclose(out, np.broadcast_to(_expected(RED), out.shape), atol=tol)


def test_crop_offsets_and_upscale():
    # 6 wide x 4 high with distinct columns; size 4 keeps columns 1..4 without resizing.
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[:, :, 0] = np.arange(6, dtype=np.uint8)[None, :] * 40
    out = preprocess(arr, size=4, mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_array_equal(out[0, :, 0] * 255, [40, 80, 120, 160])
    # a small image is upscaled: short side 2 -> 8, long side 3 -> 12, crop centre 8
    up = preprocess(_uniform(2, 3, RED), size=8, mean=CLIP_MEAN, std=CLIP_STD)
    np.testing.assert_array_equal(up, np.broadcast_to(_expected(RED), (8, 8, 3)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_encoded_bytes(fmt):
    arr = _uniform(30, 20, RED)
    data = _encode(arr, fmt)
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (20, 30)
    out = preprocess(data, size=10, mean=CLIP_MEAN, std=CLIP_STD)
    atol = 0 if fmt == "PNG" else 4 / 255 / min(CLIP_STD)  # JPEG is lossy
    np.testing.assert_allclose(out, np.broadcast_to(_expected(RED), out.shape), atol=atol)
    np.testing.assert_array_equal(preprocess(bytearray(data), size=10, mean=CLIP_MEAN,
                                             std=CLIP_STD), out)


def test_path_pil_and_mode_conversion(tmp_path):
    arr = _uniform(12, 12, BLUE)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    for src in (path, str(path)):
        np.testing.assert_array_equal(np.asarray(load_image(src)), arr)
    rgba = Image.fromarray(arr).convert("RGBA")
    gray = Image.new("L", (5, 7), 128)
    assert load_image(rgba).mode == "RGB"
    assert np.asarray(load_image(gray)).shape == (7, 5, 3)


def test_batch():
    images = [_uniform(10, 20, RED), _uniform(20, 10, BLUE), _encode(_uniform(9, 9, RED), "PNG")]
    out = preprocess_batch(images, size=8, mean=CLIP_MEAN, std=CLIP_STD)
    assert out.shape == (3, 8, 8, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], preprocess(images[1], size=8, mean=CLIP_MEAN, std=CLIP_STD))
    assert preprocess_batch([], size=8, mean=CLIP_MEAN, std=CLIP_STD).shape == (0, 8, 8, 3)


def test_header_size_rejected_before_decoding():
    # 8000x8000 = 64M pixels > default 40M; the file holds no pixel data at all, so only a
    # header check can reject it (decoding would fail differently).
    with pytest.raises(ValueError, match="max_pixels=40000000"):
        load_image(_png_header(8000, 8000))
    # absurd sizes (10^10 pixels) are rejected too, without allocating
    with pytest.raises(ValueError, match="too many pixels"):
        load_image(_png_header(100_000, 100_000))
    with pytest.raises(ValueError, match="max_pixels=100"):
        load_image(_encode(_uniform(11, 10, RED), "PNG"), max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels=10"):
        preprocess(_uniform(4, 4, RED), size=2, mean=CLIP_MEAN, std=CLIP_STD, max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS is not None  # no global PIL state touched


def test_bad_inputs(tmp_path):
    png = _encode(_uniform(16, 16, RED), "PNG")
    cases = [
        (b"definitely not an image", "not a readable image"),
        (png[: len(png) // 2], "corrupt"),
        (b"", "not a readable image"),
        (tmp_path / "missing.png", "missing.png"),
        (str(tmp_path), "not found"),
        (np.zeros((4, 4), np.uint8), r"shape \(4, 4\)"),
        (np.zeros((4, 4, 4), np.uint8), r"shape \(4, 4, 4\)"),
        (np.zeros((4, 4, 3), np.float32), "float32"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (12345, "int"),
    ]
    for src, match in cases:
        with pytest.raises(ValueError, match=match):
            load_image(src)
    bad_txt = tmp_path / "notes.txt"
    bad_txt.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        load_image(bad_txt)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=0), "size"),
    (dict(size=2.5), "size"),
    (dict(mean=(0.5, 0.5)), "mean"),
    (dict(std=(0.5, 0.0, 0.5)), "std"),
    (dict(resample="magic"), "magic"),
])
def test_bad_preprocess_args(kwargs, match):
    args = dict(size=4, mean=CLIP_MEAN, std=CLIP_STD) | kwargs
    with pytest.raises(ValueError, match=match):
        preprocess(_uniform(4, 4, RED), **args)
