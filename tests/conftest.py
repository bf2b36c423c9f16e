"""Session fixtures: a tiny random DINOv2 on disk, the reference pipeline, a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from protos.dinov2.v1 import embed_pb2_grpc
from server.app import EmbedServer
from server.config import Settings
from server.model import ModelRunner, Pixels, Pooling, Tokens, pool
from server.preprocess import configured_processor
from server.random_model import build_model_dir
from tests import images


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("dinov2-tiny"), "tiny")


@pytest.fixture(scope="session")
def settings(model_dir: Path) -> Settings:
    return Settings(model=str(model_dir), host="127.0.0.1", port=0, metrics_port=0, max_wait_ms=20)


@pytest.fixture(scope="session")
def runner(settings: Settings) -> ModelRunner:
    return ModelRunner.load(settings)


class Reference:
    """The definition of an embedding: img.convert("L") -> configured processor -> AutoModel -> pooling,
    for `--preprocess` at `--image-size` (None: that mode's default)."""

    def __init__(self, model_dir: Path, image_size: int | None = None, preprocess: str = "card") -> None:
        from transformers import AutoModel

        self.processor = configured_processor(str(model_dir), None, image_size=image_size, preprocess=preprocess)
        self.model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.first_patch = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def pixels(self, data: bytes) -> np.ndarray:
        """The processor's input of one image, before rescale and normalization: uint8 [3, N, N]."""
        img = Image.open(io.BytesIO(data)).convert("L")
        raw = self.processor(img, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        return raw.astype(np.uint8)

    @torch.inference_mode()
    def embed(self, data: bytes, pooling: Pooling = Pooling.CLS, normalize: bool = False) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("L")
        pixel_values = self.processor(img, return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixel_values)
        cls_token = out.pooler_output[0].numpy()
        patch_mean = out.last_hidden_state[0, self.first_patch :].mean(dim=0).numpy()
        return pool(cls_token, patch_mean, pooling, normalize)


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="session")
def corpus() -> dict[str, bytes]:
    return images.corpus()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (PEM files)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Waits until `condition()` holds (checked every 20 ms); fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """The float32 parity rule: max abs difference <= 1e-4 x max |reference|."""
    assert actual.shape == expected.shape, what
    tolerance = 1e-4 * float(np.abs(expected).max())
    diff = float(np.abs(actual - expected).max())
    assert diff <= tolerance, f"{what}: max abs diff {diff:.3g} > {tolerance:.3g}"


class ControlledRunner:
    """The real runner, with a delay and failures the test switches on and off."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self.delay_s = 0.0
        self.failing = False
        self.fail_batches = 0
        self.images_seen = 0
        self.calls = 0  # forward passes begun, counted before any gate or delay
        self.allowed_images: float = float("inf")  # a batch that would pass this count waits in the model
        self._allowance = threading.Condition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def embed(self, pixels: Pixels, tokens: Tokens = None, full_size: bool = False) -> Any:
        self.calls += 1
        with self._allowance:
            self._allowance.wait_for(lambda: self.images_seen + len(pixels) <= self.allowed_images)
        time.sleep(self.delay_s)
        if self.failing or self.fail_batches > 0:
            self.fail_batches = max(0, self.fail_batches - 1)
            raise RuntimeError("injected fault")
        self.images_seen += len(pixels)
        return self._runner.embed(pixels, tokens, full_size)

    def allow(self, images: float) -> None:
        """Batches that would take the count of images seen past `images` wait (in the model) until raised."""
        with self._allowance:
            self.allowed_images = images
            self._allowance.notify_all()

    def warmup(self) -> None:
        size = self._runner.image_size
        self.embed(np.zeros((1, size, size), dtype=np.uint8))


class RunningServer:
    """A real EmbedServer on a loopback port, on its own event-loop thread."""

    def __init__(self, settings: Settings, runner: ModelRunner) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.server: EmbedServer = self.call(self._make, settings, runner)
        self.port: int = self.call(self.server.start)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = embed_pb2_grpc.EmbedStub(self.channel)

    @staticmethod
    async def _make(settings: Settings, runner: ModelRunner) -> EmbedServer:
        return EmbedServer(settings, runner)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs a coroutine function on the server's loop and waits for it."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)
        return future.result(timeout=120)

    @property
    def metrics(self):
        return self.server.metrics

    def stop(self, grace: float = 5.0) -> None:
        self.channel.close()
        self.call(self.server.stop, grace)
        self.end_loop()

    def end_loop(self) -> None:
        """Ends the event-loop thread, once the server has stopped (`stop` does both)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(settings: Settings, runner: ModelRunner) -> Iterator[RunningServer]:
    running = RunningServer(settings, runner)
    yield running
    running.stop()


def _server_factory(settings: Settings, runner: ModelRunner) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def make(runner_: Any = None, **changes: Any) -> RunningServer:
        running = RunningServer(dataclasses.replace(settings, **changes), runner_ or runner)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop(grace=1.0)


@pytest.fixture
def make_server(settings: Settings, runner: ModelRunner) -> Iterator[Callable[..., RunningServer]]:
    """Starts extra servers with changed settings (and runner); stops them after the test."""
    yield from _server_factory(settings, runner)


@pytest.fixture(scope="module")
def make_server_module(settings: Settings, runner: ModelRunner) -> Iterator[Callable[..., RunningServer]]:
    """make_server for servers shared by the tests of one module."""
    yield from _server_factory(settings, runner)


@pytest.fixture(scope="module")
def http(make_server_module: Callable[..., RunningServer]) -> RunningServer:
    """One server with HTTP on a free port, shared by the tests of a module that change nothing on it."""
    return make_server_module(http_port=0)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for one test."""
    async with aiohttp.ClientSession() as session:
        yield session
