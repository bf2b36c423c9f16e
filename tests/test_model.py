"""Parity of the fast path (batched decode + on-device normalization) with the reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from server.config import Settings
from server.model import ModelRunner, Pooling, pool, resolve_device, resolve_dtype
from server.preprocess import ImageLimits, decode
from tests.conftest import Reference, assert_close

LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=50_000_000)


def embed_fast(
    runner: ModelRunner, datas: list[bytes], pooling: Pooling, normalize: bool, resize_on: str = "workers"
) -> list[np.ndarray]:
    """The service's path: decode (and resize, in the workers), then the runner (which resizes on its
    device the images still at full size)."""
    geometry = runner.norm.geometry
    if resize_on == "workers":
        pixels: list[np.ndarray] | np.ndarray = np.stack([decode(d, LIMITS, geometry) for d in datas])
    else:
        pixels = [decode(data, LIMITS, geometry, resize=False) for data in datas]
    out = runner.embed(pixels, full_size=resize_on == "device")
    return [pool(out.cls[i], out.mean[i], pooling, normalize) for i in range(len(datas))]


@pytest.mark.parametrize("resize_on", ["workers", "device"])
@pytest.mark.parametrize("pooling", list(Pooling))
@pytest.mark.parametrize("normalize", [False, True])
def test_float32_batch_equals_reference_on_every_format(
    runner: ModelRunner,
    reference: Reference,
    corpus: dict[str, bytes],
    pooling: Pooling,
    normalize: bool,
    resize_on: str,
) -> None:
    names = list(corpus)
    fast = embed_fast(runner, [corpus[n] for n in names], pooling, normalize, resize_on)
    for name, vec in zip(names, fast, strict=True):
        assert_close(vec, reference.embed(corpus[name], pooling, normalize), name)


def test_the_device_resize_gives_the_workers_pixels_and_embeddings(
    runner: ModelRunner, corpus: dict[str, bytes]
) -> None:
    """Bit-exact: the model input of a mixed-size batch resized on the device equals the workers' one."""
    datas = list(corpus.values())
    in_workers = np.stack([decode(data, LIMITS, runner.image_size) for data in datas])
    full_size = [decode(data, LIMITS, runner.image_size, resize=False) for data in datas]
    assert len({image.shape for image in full_size}) > 3
    assert np.array_equal(runner.pixel_values(full_size, True).numpy(), runner.pixel_values(in_workers).numpy())
    a, b = runner.embed(in_workers), runner.embed(full_size, full_size=True)
    assert np.array_equal(a.cls, b.cls) and np.array_equal(a.mean, b.mean)


def test_embedding_sizes(runner: ModelRunner, corpus: dict[str, bytes]) -> None:
    data = [corpus["png_rgb"]]
    dim = runner.embedding_dim
    assert embed_fast(runner, data, Pooling.CLS, False)[0].shape == (dim,)
    assert embed_fast(runner, data, Pooling.MEAN, False)[0].shape == (dim,)
    assert embed_fast(runner, data, Pooling.CLS_MEAN, False)[0].shape == (2 * dim,)
    assert np.linalg.norm(embed_fast(runner, data, Pooling.CLS, True)[0]) == pytest.approx(1.0, abs=1e-5)


def test_different_images_give_different_embeddings(runner: ModelRunner, corpus: dict[str, bytes]) -> None:
    a, b = embed_fast(runner, [corpus["png_rgb"], corpus["webp"]], Pooling.CLS, False)
    assert float(np.abs(a - b).max()) > 100 * 1e-4 * float(np.abs(a).max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_cosine_to_float32_reference(
    settings: Settings, reference: Reference, corpus: dict[str, bytes], dtype: str
) -> None:
    half = ModelRunner.load(dataclasses.replace(settings, dtype=dtype))
    assert half.dtype_name == dtype
    names = ["png_rgb", "jpeg_gray", "webp", "tiny_1x1", "large_6000x4000"]
    for pooling in Pooling:
        for name, vec in zip(names, embed_fast(half, [corpus[n] for n in names], pooling, False), strict=True):
            ref = reference.embed(corpus[name], pooling)
            cosine = float(vec @ ref / (np.linalg.norm(vec) * np.linalg.norm(ref)))
            assert cosine >= 0.999, f"{dtype} {pooling} {name}: cosine {cosine:.5f}"


def test_auto_dtype_and_device_on_cpu() -> None:
    import torch

    device = resolve_device("auto" if not torch.cuda.is_available() else "cpu")
    assert device.type == "cpu"
    assert resolve_dtype("auto", device) == torch.float32
    assert resolve_dtype("bfloat16", device) == torch.bfloat16
