"""Image loading and preprocessing for the vision encoder (Pillow + numpy, no JAX).

`load_image` turns bytes, a path, a PIL image or an HxWx3 uint8 array into an RGB PIL
image, rejecting oversized images from their header before any pixel is decoded.
`preprocess` matches CLIP's processor: resize the short side to `size` (keep aspect),
centre-crop `size x size`, scale to [0, 1], normalise by mean/std; channels last.
`qwen_patches` matches the Qwen-VL processors: resize to the nearest multiple of
patch_size * spatial_merge_size within the pixel budget (`smart_resize`), scale, normalise,
cut into the flattened patches the Qwen-VL tower takes (`qwen_vision`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 40_000_000
"""Default limit on width * height of an input image."""

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, np.ndarray]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def load_image(src: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `src` (encoded bytes, file path, PIL image, or [H, W, 3] uint8 array) to RGB.

    The pixel count is checked against `max_pixels` from the header before decoding.
    An RGB PIL image is returned as is (not copied).
    Raises ValueError for unreadable/corrupt data, a missing file, a bad array, or too
    many pixels.
    """
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels, "PIL image")
        return src if src.mode == "RGB" else src.convert("RGB")
    if isinstance(src, np.ndarray):
        if src.ndim != 3 or src.shape[2] != 3 or src.dtype != np.uint8:
            raise ValueError(f"image array must be [H, W, 3] uint8, got shape {src.shape} "
                             f"dtype {src.dtype}")
        if src.shape[0] == 0 or src.shape[1] == 0:
            raise ValueError(f"image array is empty: shape {src.shape}")
        _check_pixels((src.shape[1], src.shape[0]), max_pixels, "image array")
        return Image.fromarray(np.ascontiguousarray(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return _decode(io.BytesIO(data), max_pixels, f"<{len(data)} bytes>")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ValueError(f"image file not found: {str(path)!r}")
        with open(path, "rb") as f:
            return _decode(f, max_pixels, repr(str(path)))
    raise ValueError(f"unsupported image source type {type(src).__name__}: expected bytes, "
                     "path, PIL image or uint8 array")


def preprocess(image: ImageSource, *, size: int, mean: Sequence[float],
               std: Sequence[float], resample: str = "bicubic",
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image as the vision encoder's input, float32 [size, size, 3].

        img = resize(load_image(image), short side -> size, long side -> floor(long*size/short))
        img = centre_crop(img, size, size)
        out = (img / 255 - mean) / std
    """
    _check_size(size)
    mean32, std32 = _check_stats(mean, "mean"), _check_stats(std, "std")
    if not np.all(std32 > 0):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; expected one of {sorted(_RESAMPLE)}")
    img = load_image(image, max_pixels=max_pixels)
    img = _resize_short_side(img, size, _RESAMPLE[resample])
    img = _centre_crop(img, size)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # [size, size, 3]
    return (x - mean32) / std32


def preprocess_batch(images: Sequence[ImageSource], *, size: int, mean: Sequence[float],
                     std: Sequence[float], resample: str = "bicubic",
                     max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`preprocess` of each image, stacked: float32 [N, size, size, 3] (N may be 0)."""
    _check_size(size)
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        out[i] = preprocess(image, size=size, mean=mean, std=std, resample=resample,
                            max_pixels=max_pixels)
    return out


def _decode(fp: Any, max_pixels: int, what: str) -> Image.Image:
    """Open an encoded image, check its header size, then decode it to RGB."""
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {what} has too many pixels (limit {max_pixels}): {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"not a readable image: {what}: {e}") from None
    with img:
        _check_pixels(img.size, max_pixels, what)
        try:
            img.load()
            return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"corrupt image data: {what}: {e}") from None


def _check_pixels(wh: tuple[int, int], max_pixels: int, what: str) -> None:
    """ValueError if a (width, height) image exceeds `max_pixels`."""
    w, h = wh
    if w * h > max_pixels:
        raise ValueError(f"image {what} is {w}x{h} = {w * h} pixels, more than "
                         f"max_pixels={max_pixels}")


def _check_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _check_stats(v: Sequence[float], name: str) -> np.ndarray:
    """Per-channel statistics as float32 [3]."""
    arr = np.asarray(v, dtype=np.float32)
    if arr.shape != (3,):
        raise ValueError(f"{name} must have 3 values (R, G, B), got {v!r}")
    return arr


def _resize_short_side(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so min(w, h) == size, the long side to floor(long * size / short)."""
    w, h = img.size
    if w <= h:
        new = (size, h * size // w)
    else:
        new = (w * size // h, size)
    return img if new == (w, h) else img.resize(new, resample=resample)


def _centre_crop(img: Image.Image, size: int) -> Image.Image:
    """The central size x size window (offsets rounded down)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    if (left, top, w, h) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled (aspect kept) into
    [min_pixels, max_pixels] pixels: the Qwen-VL processors' rule."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {width}x{height} pixels: each side must be >= 1 and the aspect ratio <= 200")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = np.sqrt(height * width / max_pixels)
        h = max(factor, int(np.floor(height / beta / factor)) * factor)
        w = max(factor, int(np.floor(width / beta / factor)) * factor)
    elif h * w < min_pixels:
        beta = np.sqrt(min_pixels / (height * width))
        h, w = int(np.ceil(height * beta / factor)) * factor, int(np.ceil(width * beta / factor)) * factor
    return h, w


def qwen_patches(frames: ImageSource | Sequence[ImageSource], cfg, *, max_pixels: int = MAX_PIXELS,
                 resample: str = "bicubic") -> tuple[np.ndarray, tuple[int, int, int]]:
    """An image (or a clip: a sequence of frames, all resized to the first's size) as the
    Qwen-VL tower's input: (patches [t*h*w, 3*T*p*p] float32, grid (t, h, w)).

    cfg: a QwenVisionConfig (patch_size p, temporal_patch_size T, spatial_merge_size m, pixel
    budget, mean, std). Each frame is resized (`smart_resize`, factor p*m), scaled to [0, 1] and
    normalised; the frames (an image is one) are repeated at the end up to a multiple of T.
    Patches run frame by frame, over the merge units row-major, then over each unit's m x m
    patches row-major; a patch's values over channel, frame, pixel row, pixel column."""
    clip = isinstance(frames, (list, tuple))
    images = [load_image(f, max_pixels=max_pixels) for f in (frames if clip else [frames])]
    if not images:
        raise ValueError("a clip needs at least one frame")
    p, m, tp = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    w0, h0 = images[0].size
    height, width = smart_resize(h0, w0, p * m, cfg.min_pixels, cfg.max_pixels)
    mean, std = _check_stats(cfg.image_mean, "image_mean"), _check_stats(cfg.image_std, "image_std")
    pixels = np.stack([np.asarray(img.resize((width, height), resample=_RESAMPLE[resample])
                                  if img.size != (width, height) else img, np.float32) / 255.0
                       for img in images])                                             # [F, H, W, 3]
    pixels = ((pixels - mean) / std).transpose(0, 3, 1, 2)                              # [F, 3, H, W]
    pixels = np.concatenate([pixels, np.repeat(pixels[-1:], -len(pixels) % tp, axis=0)])
    t, h, w = len(pixels) // tp, height // p, width // p
    patches = pixels.reshape(t, tp, 3, h // m, m, p, w // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(t * h * w, 3 * tp * p * p), np.float32), (t, h, w)
