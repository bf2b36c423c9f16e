"""A corpus of hostile and broken inputs, each with the words its error must contain."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib

from PIL import Image

from tests import images

# Server limits the corpus is written against (tests start a server with them).
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, idat: bytes | None = None, color_type: int = 0) -> bytes:
    """A PNG whose header claims width x height (8-bit), with the given compressed data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    body = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def real_400_megapixel_png() -> bytes:
    """A genuine 20000x20000 grayscale PNG (all black): 400 MP that compresses to ~400 KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * 20001  # filter byte + 20000 pixels
    parts = [compressor.compress(row * 500) for _ in range(40)]
    parts.append(compressor.flush())
    return png_claiming(20000, 20000, b"".join(parts))


def bmp_claiming(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54 + 16, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 16, 2835, 2835, 0, 0)
    return header + info + b"\x00" * 16


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG with its SOF0 dimensions rewritten."""
    data = bytearray(images.jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("a.txt", "hello")
    return buf.getvalue()


def _bad_crc_png() -> bytes:
    data = bytearray(images.png(32, 32))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a phrase the INVALID_ARGUMENT message must contain)."""
    png = images.png(64, 64)
    jpeg = images.jpeg(64, 64)
    undecodable = "not a decodable image"
    return {
        "empty": (b"", "empty image"),
        "text": (b"just some text, no pixels here\n" * 4, undecodable),
        "html": (b"<!doctype html><html><body><img src=x></body></html>", undecodable),
        "pdf": (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF", undecodable),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', undecodable),
        "json": (b'{"image": "cat.jpg"}', undecodable),
        "random": (os.urandom(4096), undecodable),
        "nul_bytes": (b"\x00" * 1000, undecodable),
        "zip": (_zip(), undecodable),
        "elf": (b"\x7fELF\x02\x01\x01" + b"\x00" * 200, undecodable),
        "utf16_text": ("hello image".encode("utf-16"), undecodable),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "truncated_png": (png[: len(png) // 2], "truncated PNG"),
        "png_signature_only": (png[:8], "truncated PNG"),
        "png_header_only": (png[:33], "PNG"),
        "jpeg_header_only": (jpeg[:20], "JPEG"),
        "gif_header_only": (b"GIF89a\x10\x00\x10\x00\x00\x00\x00", "GIF"),
        "webp_header_only": (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image"),
        "png_bad_crc": (_bad_crc_png(), "PNG"),
        "png_zero_width": (png_claiming(0, 10), "corrupt or truncated PNG"),
        "png_claims_100000x100000": (png_claiming(100_000, 100_000), "over the limit of 50000000"),
        "png_real_400_megapixels": (real_400_megapixel_png(), "over the limit of 50000000"),
        "bmp_claims_100000x100000": (bmp_claiming(100_000, 100_000), "over the limit of 50000000"),
        "jpeg_claims_65000x65000": (jpeg_claiming(65000, 65000), "over the limit of 50000000"),
        "tiff_truncated": (images.encode(images.rgb(64, 64), "TIFF")[:300], "image"),
        "too_many_bytes": (b"\xff\xd8" + b"\x00" * (MAX_IMAGE_BYTES + 1), f"over the limit of {MAX_IMAGE_BYTES}"),
        "ico_garbage": (b"\x00\x00\x01\x00\x01\x00" + os.urandom(200), "image"),
    }


def many_frames_gif(frames: int = 2000) -> bytes:
    """A small animated GIF with many frames: accepted, only the first frame is decoded."""
    first = Image.new("P", (32, 32), 1)
    rest = [Image.new("P", (32, 32), i % 200) for i in range(frames - 1)]
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=rest, duration=10)
    return buf.getvalue()
