"""The benchmark's input: distinct grayscale JPEGs and PNGs, made in memory."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def gray_jpeg(seed: int, size: int = 512, quality: int = 90) -> bytes:
    """A photo-like grayscale JPEG: gradients, blocks and noise, different for each seed."""
    return _encode(_photo(seed, size), "JPEG", quality=quality)


def gray_png(seed: int, size: int = 64) -> bytes:
    """The same photo-like picture as a grayscale PNG."""
    return _encode(_photo(seed, size), "PNG")


def _photo(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = 96 * np.sin(x / size * (2 + seed % 7) * np.pi) * np.cos(y / size * (1 + seed % 5) * np.pi)
    blocks = 60 * (((x // (13 + seed % 11)) + (y // (17 + seed % 13))) % 2)
    pixels = 100 + wave + blocks + rng.normal(0, 10, (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def gray_jpegs(count: int, size: int = 512) -> list[bytes]:
    """`count` distinct JPEGs."""
    return [gray_jpeg(seed, size) for seed in range(count)]


def gray_pngs(count: int, size: int = 64) -> list[bytes]:
    """`count` distinct PNGs."""
    return [gray_png(seed, size) for seed in range(count)]


def noise_png(side: int = 1680, seed: int = 7) -> bytes:
    """Random RGB noise as a PNG at compress level 1: ~8.5 MB at 1680 a side (noise does not compress), as
    tests/test_limits.py sends it: the most bytes a pixel can cost on the wire and in decoding."""
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)), "PNG", compress_level=1)
