"""Decoding: every bad input is an InvalidImage that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from server.errors import InvalidImage
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
