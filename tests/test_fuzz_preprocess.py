"""Property test of the decode path on mutated real images: it returns a 224x224 uint8
image or raises InvalidImage; never another exception, a hang or a huge allocation."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import InvalidImage
from server.preprocess import ImageLimits, decode
from tests import images

SEEDS = {
    "png": images.png(40, 30, seed=1),
    "jpeg": images.jpeg(48, 40, seed=2),
    "gif": images.encode(images.rgb(30, 20, seed=3).convert("P"), "GIF"),
    "bmp": images.encode(images.rgb(20, 20, seed=4), "BMP"),
    "tiff": images.encode(images.rgb(24, 16, seed=5), "TIFF"),
    "webp": images.encode(images.rgb(32, 32, seed=6), "WEBP"),
}
LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=4_000_000)
MB = 1 << 20
PEAK_BYTES = 32 * LIMITS.max_pixels
"""The most one decode may add to the process's resident memory: Pillow holds a decoded image at up to
4 bytes a pixel and a codec may keep its own copy (a flat 4-megapixel RGBA WebP measured 61 MB, 15 bytes
a pixel; PNG, TIFF 19 MB; CMYK JPEG 35 MB), so 32 bytes a pixel of the limit is twice the worst measured.
A decode past the pixel limit, or a buffer sized by a corrupt header, is far above it."""

_libc = ctypes.CDLL(None)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def restart_peak() -> int:
    """Restarts this process's peak resident memory (VmHWM) at its RSS now, and returns that RSS.

    Pillow and the codecs allocate pixels with malloc, which tracemalloc does not see (numpy's it does);
    resident memory sees both. Free heap memory is handed back first (glibc's malloc_trim), so a
    decode's allocation cannot hide in memory the process already held: VmHWM less the RSS returned
    here is then what the decode itself took at its peak, whatever ran in this process before.
    """
    _libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # an OSError here: the kernel cannot restart the peak
    return _status_bytes("VmRSS")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        elif action == "truncate":
            del data[position:]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(mutated())
def test_mutated_images_decode_or_fail_cleanly(data: bytes) -> None:
    before = restart_peak()
    try:
        out = decode(data, LIMITS, 224)
    except InvalidImage as exc:
        assert str(exc)
    else:
        assert out.shape == (224, 224) and out.dtype == np.uint8
    took = _status_bytes("VmHWM") - before
    assert took < PEAK_BYTES, f"the decode took {took / MB:.0f} MB at its peak, over {PEAK_BYTES / MB:.0f} MB"
