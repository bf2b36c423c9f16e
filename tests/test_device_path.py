"""The data path to the device: staging buffers, the batch limit (auto, lowered on OOM), the null model.

No GPU here: the staging code runs without pinning (the same code otherwise),
and out-of-memory is a fake forward raising `torch.OutOfMemoryError`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from protos.dinov2.v1 import embed_pb2 as pb
from server import batch_size
from server.batcher import Batcher
from server.config import Settings, load_settings
from server.metrics import Metrics
from server.model import BatchOutput, ModelRunner
from server.random_model import build_model_dir
from server.staging import Staging
from tests.conftest import Reference, RunningServer, assert_close
from tests.images import jpeg


def random_pixels(count: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size), dtype=np.uint8)


def test_staging_fills_buffers_in_turn_and_keeps_the_previous_batch(runner: ModelRunner) -> None:
    staging = Staging(torch.device("cpu"), 8)
    first, second, third = random_pixels(3, 8, 1), random_pixels(2, 8, 2), random_pixels(4, 8, 3)
    a = staging.to_device(first)
    b = staging.to_device(list(second))  # a sequence of images is stacked straight into the buffer
    assert not staging.pinned
    assert np.array_equal(a.numpy(), first) and np.array_equal(b.numpy(), second)
    c = staging.to_device(third)  # back to the first buffer, grown to 4 images
    assert np.array_equal(b.numpy(), second) and np.array_equal(c.numpy(), third)


def test_staged_input_gives_the_same_embeddings_as_a_direct_tensor(runner: ModelRunner) -> None:
    pixels = random_pixels(5)
    with torch.inference_mode():
        direct = runner.model(pixel_values=torch.from_numpy(pixels).unsqueeze(1).float())
    staged = runner.embed(pixels)
    listed = runner.embed(list(pixels))
    np.testing.assert_array_equal(staged.cls, direct.pooler_output.numpy())
    np.testing.assert_array_equal(staged.mean, direct.last_hidden_state[:, 1:].mean(dim=1).numpy())
    np.testing.assert_array_equal(listed.cls, staged.cls)
    np.testing.assert_array_equal(listed.mean, staged.mean)


def test_auto_batch_size_is_16_on_cpu(model_dir: Path) -> None:
    assert Settings().max_batch_size == "auto"
    assert load_settings(["--max-batch-size", "auto"], {}).max_batch_size == "auto"
    assert load_settings([], {"MAX_BATCH_SIZE": "16"}).max_batch_size == 16
    runner = ModelRunner.load(Settings(model=str(model_dir), device="cpu"))
    assert runner.max_batch_size == 16 and runner.batch_limit("auto") == 16
    assert runner.batch_limit(8) == 8 and runner.batch_limit(64) == 64
    assert ModelRunner.load(Settings(model=str(model_dir), max_batch_size=4)).max_batch_size == 4


@pytest.mark.parametrize(
    ("rates", "chosen"),
    [
        ({16: 100, 32: 190, 64: 200, 128: 205, 256: 206}, 64),  # 128 gains < 5%: stop; 64 is within 5% of best
        ({16: 100, 32: 200, 64: 400, 128: None}, 64),  # 128 does not fit
        ({16: 100, 32: 101}, 16),  # doubling gains nothing
        ({16: None, 8: None, 4: 50.0}, 4),  # a small card: halve until it fits
    ],
)
def test_auto_batch_size_on_a_gpu_from_measured_rates(rates: dict[int, float | None], chosen: int) -> None:
    asked: list[int] = []

    def rate_of(size: int) -> float | None:
        asked.append(size)
        return rates.get(size, 1.0)

    assert batch_size.choose(rate_of) == chosen
    assert set(asked) <= set(rates)


class OomAbove:
    """The runner's model, raising CUDA's out-of-memory error for batches over `limit` images."""

    def __init__(self, runner: ModelRunner, limit: int) -> None:
        self.model = runner.model
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, pixel_values: torch.Tensor) -> Any:
        self.sizes.append(len(pixel_values))
        if len(pixel_values) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected, batch of {len(pixel_values)})")
        return self.model(pixel_values=pixel_values)


def oom_runner(model_dir: Path, limit: int) -> tuple[ModelRunner, OomAbove]:
    runner = ModelRunner.load(Settings(model=str(model_dir), device="cpu"))
    fake = OomAbove(runner, limit)
    runner._forward = fake  # type: ignore[assignment]
    return runner, fake


def test_oom_splits_the_batch_answers_every_image_and_lowers_the_limit_once(
    model_dir: Path, runner: ModelRunner, caplog: pytest.LogCaptureFixture
) -> None:
    small, fake = oom_runner(model_dir, limit=3)
    pixels = random_pixels(8, seed=4)
    unsplit = runner.embed(pixels)
    with caplog.at_level(logging.WARNING, logger="server.model"):
        split = small.embed(pixels)
        assert fake.sizes == [8, 4, 2, 2, 2, 2]
        again = small.embed(pixels[:5])
    assert fake.sizes[6:] == [2, 2, 1]
    np.testing.assert_allclose(split.cls, unsplit.cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split.mean, unsplit.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.cls, unsplit.cls[:5], rtol=1e-5, atol=1e-6)
    assert small.max_batch_size == 2 and small.batch_limit(16) == 2 and small.batch_limit(1) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "limited to 2 images" in warnings[0].getMessage()


def test_an_image_that_does_not_fit_alone_fails(model_dir: Path) -> None:
    small, _ = oom_runner(model_dir, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        small.embed(random_pixels(2))
    assert small.max_batch_size == 1


async def test_the_batcher_forms_batches_within_the_current_limit() -> None:
    limit = [4]
    batches: list[int] = []

    def forward(pixels: list[np.ndarray]) -> BatchOutput:
        batches.append(len(pixels))
        zeros = np.zeros((len(pixels), 1), np.float32)
        return BatchOutput(zeros, zeros)

    batcher = Batcher(forward, batch_limit=lambda: limit[0], max_wait_ms=20.0, metrics=Metrics())
    batcher.start()
    image = np.zeros((4, 4), np.uint8)
    await asyncio.gather(*(batcher.submit(image) for _ in range(8)))
    limit[0] = 3
    await asyncio.gather(*(batcher.submit(image) for _ in range(6)))
    await batcher.close()
    assert batches == [4, 4, 3, 3]


class EmbedCalls:
    """A runner that records the batch sizes the batcher hands it."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def embed(self, pixels: Any) -> BatchOutput:
        self.sizes.append(len(pixels))
        return self._runner.embed(pixels)


def test_a_server_answers_every_image_through_an_oom_and_batches_smaller_after(
    model_dir: Path, make_server: Any
) -> None:
    small, fake = oom_runner(model_dir, limit=2)
    calls = EmbedCalls(small)
    server: RunningServer = make_server(calls, max_batch_size=8, max_wait_ms=200)
    datas = [jpeg(64, 64, seed=s) for s in range(8)]
    request = pb.EmbedRequest(images=[pb.Image(data=d, id=str(i)) for i, d in enumerate(datas)])
    for _ in range(2):
        response = server.stub.Embed(request, timeout=60)
        assert not any(e.HasField("error") for e in response.embeddings)
        assert len(response.embeddings) == 8
    first_big = next(i for i, size in enumerate(calls.sizes) if size > 2)  # ran out of memory, was split
    assert max(fake.sizes) > 2 and small.max_batch_size == 2
    after = calls.sizes[first_big + 1 :]
    assert len(after) >= 4 and max(after) <= 2  # the batcher formed every later batch within the new limit


@pytest.fixture(scope="module")
def null_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("dinov2-null"), "null")


def test_the_null_model_loads_and_serves(null_dir: Path, settings: Settings, make_server: Any) -> None:
    null = ModelRunner.load(Settings(model=str(null_dir), device="cpu"))
    assert null.embedding_dim == 16 and null.image_size == 224
    assert null.model.config.num_hidden_layers == 1 and null.model.config.patch_size == 56
    server: RunningServer = make_server(null)
    data = jpeg(300, 200, seed=3)
    response = server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=data, id="a")]), timeout=60)
    assert_close(np.asarray(response.embeddings[0].values, np.float32), Reference(null_dir).embed(data), "null")
