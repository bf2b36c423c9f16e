"""Images for tests: every format and mode the service must take, made in memory."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 picture with gradients, shapes and noise, different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 127 * np.sin(x / max(width, 1) * (3 + seed) * np.pi)
    g = 255 * y / max(height - 1, 1)
    b = 255 * (((x // 17) + (y // 23) + seed) % 2)
    rgb = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern(width, height, seed))


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode(rgb(width, height, seed), "PNG")


def jpeg(width: int = 512, height: int = 512, seed: int = 0, gray: bool = False) -> bytes:
    img = rgb(width, height, seed)
    return encode(img.convert("L") if gray else img, "JPEG", quality=90)


def corpus() -> dict[str, bytes]:
    """Named images covering formats, modes and sizes the parity tests run on."""
    base = rgb(301, 217, seed=1)
    sixteen = (pattern(120, 90, 2)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    frames = [rgb(80, 60, seed=s).convert("P", palette=Image.Palette.ADAPTIVE) for s in (3, 4)]
    gif_buf = io.BytesIO()
    frames[0].save(gif_buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return {
        "png_rgb": encode(base, "PNG"),
        "png_rgba": encode(Image.fromarray(np.dstack([pattern(150, 200, 5), pattern(150, 200, 6)[..., :1]])), "PNG"),
        "png_la": encode(rgb(97, 131, 7).convert("LA"), "PNG"),
        "png_palette": encode(rgb(160, 120, 8).convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "png_16bit": encode(Image.fromarray(sixteen), "PNG"),
        "png_1bit": encode(rgb(64, 64, 9).convert("1"), "PNG"),
        "jpeg_rgb": encode(base, "JPEG", quality=85),
        "jpeg_gray": jpeg(512, 512, seed=10, gray=True),
        "jpeg_cmyk": encode(rgb(200, 150, 11).convert("CMYK"), "JPEG"),
        "webp": encode(rgb(256, 192, 12), "WEBP", quality=80),
        "webp_lossless_rgba": encode(rgb(90, 70, 13).convert("RGBA"), "WEBP", lossless=True),
        "bmp": encode(rgb(123, 77, 14), "BMP"),
        "tiff_rgb": encode(rgb(140, 100, 15), "TIFF"),
        "tiff_cmyk": encode(rgb(100, 140, 16).convert("CMYK"), "TIFF"),
        "tiff_float": encode(Image.fromarray(pattern(64, 80, 17)[..., 1].astype(np.float32)), "TIFF"),
        "gif_animated": gif_buf.getvalue(),
        "tiny_1x1": encode(rgb(1, 1, 18), "PNG"),
        "tiny_2x3": encode(rgb(2, 3, 19), "PNG"),
        "wide_1000x20": encode(rgb(1000, 20, 20), "PNG"),
        "tall_15x900": encode(rgb(15, 900, 21), "JPEG"),
        "exact_224": encode(rgb(224, 224, 22), "PNG"),
        "large_6000x4000": encode(rgb(6000, 4000, 23), "JPEG", quality=80),
    }
