"""The device resize (server/resize.py) equals Pillow's `Image.resize(..., BICUBIC)` bit for bit,
and Pillow's own bicubic has not changed under us."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from server.geometry import Geometry
from server.resize import _MatrixCache, coefficients, pillow_major, resize, resize_batch, vertical_first

BICUBIC = Image.Resampling.BICUBIC
LARGE = [(6000, 4000), (4000, 6000), (4000, 3000), (3000, 4000), (1, 1), (1, 4000), (6000, 1), (5000, 300)]


def shapes(count: int = 1000, seed: int = 21) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(input (w, h), output (w, h)) pairs: most small or medium, to 224 and to random sizes, up and
    down; then a few up to 6000x4000 (a dense float64 product of those takes a fifth of a second)."""
    rng = np.random.default_rng(seed)
    pairs = [(size, (224, 224)) for size in LARGE]
    while len(pairs) < count:
        limit = 2000 if len(pairs) % 10 == 0 else 700
        w, h = (int(v) for v in rng.integers(1, limit, 2))
        out = (224, 224) if len(pairs) % 2 else tuple(int(v) for v in rng.integers(1, 400, 2))
        pairs.append(((w, h), out))  # type: ignore[arg-type]
    return pairs


def pillow(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, BICUBIC))


def test_device_resize_equals_pillow_on_1000_random_shapes() -> None:
    rng = np.random.default_rng(0)
    orders = {True: 0, False: 0}
    for (w, h), out in shapes():
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)  # noise: every rounding and clip is reached
        got = resize(torch.from_numpy(pixels), out).numpy()
        expected = pillow(pixels, out)
        assert got.shape == expected.shape and got.dtype == np.uint8
        differing = int((got != expected).sum())
        assert differing == 0, f"{w}x{h} -> {out[0]}x{out[1]}: {differing} pixels differ"
        if w != out[0] and h != out[1]:
            orders[vertical_first((w, h), out)] += 1
    assert min(orders.values()) >= 50, f"both pass orders must be covered: {orders}"


def test_a_batch_of_one_size_is_resized_at_once() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, 300, 400), dtype=np.uint8)
    got = resize(torch.from_numpy(batch), (224, 224)).numpy()
    for image, resized in zip(batch, got, strict=True):
        np.testing.assert_array_equal(resized, pillow(image, (224, 224)))


def test_an_unchanged_size_is_a_copy() -> None:
    pixels = torch.arange(224 * 224, dtype=torch.int64).remainder(256).to(torch.uint8).view(224, 224)
    out = resize(pixels, (224, 224))
    assert torch.equal(out, pixels) and out.data_ptr() != pixels.data_ptr()


def test_coefficients_are_pillows_fixed_point_weights() -> None:
    matrix = coefficients(448, 224)  # a 2x reduction: 8 taps a row, summing to about 2^22
    assert matrix.shape == (224, 448)
    assert np.all(matrix == np.round(matrix))
    assert np.all(np.abs(matrix.sum(axis=1) - (1 << 22)) <= 8)


def test_pass_order_follows_the_pillow_release() -> None:
    assert vertical_first((300, 400), (224, 224), major=13)
    assert vertical_first((256, 900), (224, 224), major=13)
    assert not vertical_first((300, 400), (224, 224), major=12)
    assert not vertical_first((400, 300), (224, 224), major=13)
    assert not vertical_first((100, 150), (224, 224), major=13)  # an enlargement: horizontal first


# sha256 of Image.resize(BICUBIC) of `_fixed(w, h)` to 224x224, under Pillow 13.0 (the pinned major).
PINNED = {
    (300, 400): "ef71144a7c6bd0c438e28aa8123967e3787a2957c05216787bbc48ee23d42ee5",
    (256, 900): "8080b4108b2855f7c759dd1dbf3c0e64ae3801b1191d501b7b86ed0447a1e525",
    (400, 300): "263d89d476aed76426e19620645ca8f393ec4300e67c5c93d322f6f562a68a82",
    (100, 150): "d0791c76865e2bc58ea7486172376fef6699438adac1cd34cb0cc63761613230",
    (4000, 3000): "80df120866374a5f2796fb873c92a0db5254e6ea2bd98ae4cf686d97193b1dad",
    (1, 1000): "8bc2767f3676abf06d6d68beea616b4b6106c991d42729e2295bf2a14f17f023",
}


def _fixed(w: int, h: int) -> np.ndarray:
    """A deterministic picture: integer arithmetic only, the same on every numpy."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    return ((x * 7 + y * 13 + (x * y) % 31 + (x // 9) * (y // 11)) % 256).astype(np.uint8)


@pytest.mark.parametrize(("w", "h"), list(PINNED))
def test_pillows_bicubic_has_not_changed(w: int, h: int) -> None:
    """Fails when the installed Pillow resizes differently from the one the hashes were taken with:
    the embeddings of every image would change with it. Check the new release, then re-pin."""
    assert pillow_major() == 13, "pyproject.toml pins pillow 13; re-take these hashes when moving on"
    expected = PINNED[(w, h)]
    resized = pillow(_fixed(w, h), (224, 224))
    assert hashlib.sha256(resized.tobytes()).hexdigest() == expected, f"Pillow's bicubic of {w}x{h} changed"
    ours = resize(torch.from_numpy(_fixed(w, h)), (224, 224)).numpy()
    assert hashlib.sha256(ours.tobytes()).hexdigest() == expected


def test_the_matrix_cache_keeps_to_its_byte_bound() -> None:
    cache = _MatrixCache(max_bytes=3 * 224 * 1000 * 8)
    for side in range(1000, 1010):
        assert cache.get(side, 224, torch.device("cpu")).shape == (224, side)
        assert cache.bytes <= cache.max_bytes
    assert cache.get(1009, 224, torch.device("cpu")) is cache.get(1009, 224, torch.device("cpu"))  # still cached


def test_a_crop_keeps_only_its_rows_of_the_coefficients() -> None:
    full = coefficients(1000, 341)
    np.testing.assert_array_equal(coefficients(1000, 341, 58, 224), full[58 : 58 + 224])
    assert _MatrixCache(1 << 30).get(1000, 341, torch.device("cpu"), 58, 224).shape == (224, 1000)


@pytest.mark.parametrize("geometry", [Geometry(224, 256), Geometry(448, 512), Geometry(98, 112)])
def test_shortest_edge_and_center_crop_equal_pillow_then_the_crop(geometry: Geometry) -> None:
    """`--preprocess checkpoint` on the device: Pillow's resize of the shortest edge, then transformers'
    center crop, bit for bit, computing only the crop (both pass orders, up and down, unchanged axes)."""
    rng = np.random.default_rng(5)
    widths = rng.integers(geometry.shortest_edge, 900, 15)
    tall = [(w, 2 * w + int(rng.integers(1, 600))) for w in widths]  # shrunk more in height: vertical pass first
    sizes = [*rng.integers(1, 900, (150, 2)), *tall, (256, 300), (300, 256), (256, 256), (1, 600)]
    orders = {True: 0, False: 0}
    for w, h in sizes:
        pixels = rng.integers(0, 256, (int(h), int(w)), dtype=np.uint8)
        target = geometry.resized(int(w), int(h))
        left, top = geometry.crop_offsets(*target)
        side = geometry.size
        expected = pillow(pixels, target)[top : top + side, left : left + side]
        got = resize_batch([pixels], geometry, torch.device("cpu"))[0].numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{w}x{h} -> {target}")
        if w != target[0] and h != target[1]:
            orders[vertical_first((int(w), int(h)), target)] += 1
    assert min(orders.values()) >= 10, orders
