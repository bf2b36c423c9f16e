"""Decoding: every bad input is an InvalidImage that names the problem."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
from PIL import Image, ImageFile

from server.decode.budget import PixelBudget
from server.errors import InvalidImage, detached
from server.preprocess import ImageLimits, decode, normalization_of
from tests import images
from tests.bad_inputs import png_claiming

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=30_000_000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"hello, this is text", "not a decodable image"),
        (b"<html><body>hi</body></html>", "not a decodable image"),
        (b"%PDF-1.4\n1 0 obj\n", "not a decodable image"),
        (images.png()[:60], "corrupt or truncated PNG"),
        (images.jpeg(64, 64)[:300], "corrupt or truncated JPEG"),
        (png_claiming(100_000, 100_000), "over the limit of 30000000"),
        (png_claiming(0, 10), "corrupt or truncated PNG image: its header cannot be read"),
        (b"\x00" * 2_000_000, "over the limit of 1000000"),
    ],
)
def test_bad_inputs_raise_invalid_image_with_reason(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        decode(data, LIMITS, 224)


def test_a_6000x4000_photo_passes_the_default_pixel_limit() -> None:
    data = images.encode(Image.new("L", (6000, 4000), 128), "JPEG")
    out = decode(data, ImageLimits(max_bytes=32 * 1024 * 1024, max_pixels=50_000_000), 224)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    assert int(out.min()) == int(out.max()) == 128


def test_decode_is_grayscale_resize_of_the_image() -> None:
    img = images.rgb(300, 200, seed=3)
    out = decode(images.encode(img, "PNG"), LIMITS, 224)
    expected = np.asarray(img.convert("L").resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, expected)


def test_normalization_read_from_the_configured_processor(reference) -> None:
    norm = normalization_of(reference.processor)
    assert norm.image_size == 224
    assert norm.mean == pytest.approx((0.485, 0.456, 0.406))
    assert norm.std == pytest.approx((0.229, 0.224, 0.225))
    assert norm.rescale == pytest.approx(1 / 255)
    assert reference.processor.do_center_crop is False


def ico_holding(png: bytes, claimed: int = 256) -> bytes:
    """An ICO whose directory claims `claimed` x `claimed` but whose single entry is `png`."""
    side = 0 if claimed >= 256 else claimed
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def test_an_ico_hiding_a_larger_png_is_refused_before_its_pixels_are_decoded() -> None:
    inner = images.encode(Image.new("L", (9400, 9400)), "PNG")  # 88 MP, a few hundred KB
    data = ico_holding(inner)
    assert len(data) < 1_000_000
    budget = PixelBudget(LIMITS.max_pixels)
    with pytest.raises(InvalidImage, match="over the limit of 30000000"):
        decode(data, LIMITS, 224, budget)
    assert budget.held == 0


def test_a_pixel_limit_above_pillows_default_is_honoured() -> None:
    big = images.encode(Image.new("L", (9800, 9800), 90), "PNG")  # 96 MP > Pillow's 89.5 MP
    limits = ImageLimits(max_bytes=10_000_000, max_pixels=100_000_000)
    assert decode(big, limits, 224).shape == (224, 224)
    with pytest.raises(InvalidImage, match="over the limit of 30000000"):
        decode(big, ImageLimits(10_000_000, 30_000_000), 224)


def test_the_pixel_budget_makes_decodes_wait_for_room() -> None:
    budget = PixelBudget(100)
    order: list[str] = []
    second = budget.hold(50)
    with budget.hold(80):
        waiter = threading.Thread(target=lambda: (second.__enter__(), order.append("second")))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and budget.held == 80  # 80 + 50 > 100: it waits
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"] and budget.held == 50
    second.__exit__(None, None, None)
    with budget.hold(10_000):  # larger than the whole budget: takes all of it once the rest is free
        pass


def test_a_refused_image_keeps_no_reference_to_its_pixels() -> None:
    data = images.png(2000, 2000)[:-5000]
    import gc
    import weakref

    refs: list[weakref.ref[Image.Image]] = []
    original = ImageFile.ImageFile.load

    def tracking_load(self: ImageFile.ImageFile):
        refs.append(weakref.ref(self))
        return original(self)

    try:
        ImageFile.ImageFile.load = tracking_load  # type: ignore[method-assign]
        try:
            decode(data, ImageLimits(20_000_000, 30_000_000), 224)
        except InvalidImage as exc:
            kept = detached(exc)
    finally:
        ImageFile.ImageFile.load = original  # type: ignore[method-assign]
    gc.disable()
    try:
        assert refs and all(ref() is None for ref in refs), "the refused image is still alive"
        assert kept.__traceback__ is None and kept.__context__ is None and "truncated" in str(kept)
    finally:
        gc.enable()


def test_full_size_decode_is_the_grayscale_image_unresized() -> None:
    img = images.rgb(300, 200, seed=4)
    out = decode(images.encode(img, "PNG"), LIMITS, 224, resize=False)
    np.testing.assert_array_equal(out, np.asarray(img.convert("L")))


def test_fast_decode_scales_a_large_jpeg_down_in_the_decoder() -> None:
    limits = ImageLimits(max_bytes=10_000_000, max_pixels=30_000_000)
    data = images.jpeg(1600, 2000, seed=5)
    budget = PixelBudget(limits.max_pixels)
    held: list[int] = []
    original = budget.hold
    budget.hold = lambda pixels: (held.append(pixels), original(pixels))[1]  # type: ignore[method-assign]
    full = decode(data, limits, 224, resize=False, fast=True, budget=budget)
    assert full.shape == (1000, 800)  # 1/2 scale: 1/4 would leave 400 < 2 x 224 pixels a side
    assert held == [1000 * 800]  # the budget counts the pixels decoded, not the header's
    exact = decode(data, limits, 224).astype(np.float64)
    fast = decode(data, limits, 224, fast=True).astype(np.float64)
    assert fast.shape == (224, 224) and not np.array_equal(fast, exact)
    cosine = float((fast - fast.mean()).ravel() @ (exact - exact.mean()).ravel()) / (
        np.linalg.norm(fast - fast.mean()) * np.linalg.norm(exact - exact.mean())
    )
    assert cosine > 0.95


def test_fast_decode_leaves_other_formats_and_small_jpegs_exact() -> None:
    for data in (images.png(600, 500), images.jpeg(400, 300)):
        np.testing.assert_array_equal(decode(data, LIMITS, 224, fast=True), decode(data, LIMITS, 224))
