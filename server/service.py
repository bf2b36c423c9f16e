"""The service API shared by every transport: validate, decode, submit, pool.

The gRPC servicer and the RunPod handler both call `EmbedService.embed`. It
checks the request, admits it against the bound on images in flight, decodes
each image on a worker pool (so one bad image fails alone, before batching),
hands the pixels to the batcher and pools the model output per image.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from server.admission import Admission
from server.batcher import Batcher
from server.config import Settings
from server.errors import EmbedError, InvalidRequest, Unavailable
from server.metrics import Metrics
from server.model import ModelRunner, Pooling, pool
from server.preprocess import ImageLimits, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedOptions:
    pooling: Pooling = Pooling.CLS
    normalize: bool = False


@dataclass(frozen=True)
class ImageResult:
    """One image's answer: an embedding, or the error that stopped it."""

    embedding: np.ndarray | None = None
    error: EmbedError | None = None
    preprocess_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0


@dataclass(frozen=True)
class ServiceInfo:
    model_id: str
    revision: str
    embedding_dim: int
    image_size: int
    dtype: str
    device: str
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_bytes: int
    max_queue_images: int
    server_version: str


def _package_version() -> str:
    try:
        return version("dinov2-embed")
    except PackageNotFoundError:
        return "unknown"


class EmbedService:
    """One loaded model behind a dynamic batcher, shared by every caller."""

    def __init__(self, settings: Settings, runner: ModelRunner, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics or Metrics()
        self._limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self._decode_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="decode")
        self._batcher = Batcher(
            runner.embed,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            metrics=self.metrics,
            probe=runner.warmup,
            probe_interval_s=settings.probe_interval_s,
            on_health=self._set_healthy,
            more_coming=lambda: self._decoding > 0,
        )
        self._decoding = 0
        self._admission = Admission(settings.max_queue_images)
        self._ready = False
        self._healthy = True
        self._draining = False
        self._health_listeners: list[Callable[[bool], None]] = []
        self.info = ServiceInfo(
            model_id=settings.model,
            revision=settings.revision or "",
            embedding_dim=runner.embedding_dim,
            image_size=runner.image_size,
            dtype=runner.dtype_name,
            device=str(runner.device),
            max_batch_size=settings.max_batch_size,
            max_images_per_request=settings.max_images_per_request,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_request_bytes=settings.max_request_bytes,
            max_queue_images=settings.max_queue_images,
            server_version=_package_version(),
        )
        self.metrics.model_info.info({k: str(v) for k, v in vars(self.info).items()})

    @property
    def serving(self) -> bool:
        """True when warmed up, the inference worker is healthy and not draining."""
        return self._ready and self._healthy and not self._draining

    def add_health_listener(self, listener: Callable[[bool], None]) -> None:
        """Calls `listener(serving)` now and on every change."""
        self._health_listeners.append(listener)
        listener(self.serving)

    async def start(self) -> None:
        """Starts the batcher and warms the model up; only then does it serve."""
        self._batcher.start()
        await asyncio.get_running_loop().run_in_executor(self._decode_pool, self.runner.warmup)
        self._ready = True
        self._notify()
        log.info("engine ready: batches of up to %d, max wait %.1f ms, queue bound %d images",
                 self.settings.max_batch_size, self.settings.max_wait_ms, self.settings.max_queue_images)  # fmt: skip

    def begin_drain(self) -> None:
        """Refuses new work with `Unavailable`; work already accepted goes on."""
        self._draining = True
        self._notify()

    async def close(self) -> None:
        await self._batcher.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    async def embed(
        self, images: Sequence[bytes], options: EmbedOptions, deadline: float | None = None, wait: bool = False
    ) -> list[ImageResult]:
        """Embeds the images of one request, in order; per-image failures are in the results.

        Raises a request-level `EmbedError` when the request cannot be taken
        at all: malformed, the engine draining, or over the queue bound (unless
        `wait`, which queues for capacity instead). `deadline` is a
        `time.monotonic()` instant.
        """
        if self._draining or not self._ready:
            raise Unavailable("server is draining" if self._draining else "server is not ready yet")
        if not images:
            raise InvalidRequest("request has no images")
        limit = self.settings.max_images_per_request
        if len(images) > limit:
            raise InvalidRequest(f"request has {len(images)} images, over the limit of {limit} per request")
        if wait:
            await self._admission.acquire(len(images))
        else:
            self._admission.try_acquire(len(images))
        self.metrics.in_flight.set(self._admission.in_flight)
        queued = [0]  # images handed to the batcher; it counts its own drops
        try:
            results = await asyncio.gather(*(self._embed_one(data, options, deadline, queued) for data in images))
        except asyncio.CancelledError:
            self.metrics.dropped.labels("cancelled").inc(len(images) - queued[0])  # left before the queue
            raise
        finally:
            self._admission.release(len(images))
            self.metrics.in_flight.set(self._admission.in_flight)
        for result in results:
            self.metrics.images.labels(type(result.error).__name__ if result.error else "ok").inc()
        return list(results)

    async def _embed_one(
        self, data: bytes, options: EmbedOptions, deadline: float | None, queued: list[int]
    ) -> ImageResult:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._decoding += 1
        try:
            pixels = await loop.run_in_executor(self._decode_pool, decode, data, self._limits, self.runner.image_size)
        except EmbedError as exc:
            return ImageResult(error=exc, preprocess_s=time.monotonic() - started)
        finally:
            self._decoding -= 1
        preprocess_s = time.monotonic() - started
        self.metrics.preprocess_seconds.observe(preprocess_s)
        queued[0] += 1
        try:
            out = await self._batcher.submit(pixels, deadline)
        except EmbedError as exc:
            return ImageResult(error=exc, preprocess_s=preprocess_s)
        embedding = pool(out.cls, out.mean, options.pooling, options.normalize)
        return ImageResult(embedding, None, preprocess_s, out.queue_s, out.inference_s)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            log.warning("inference worker is %s", "healthy again" if healthy else "failing: NOT_SERVING")
            self._healthy = healthy
            self._notify()

    def _notify(self) -> None:
        for listener in self._health_listeners:
            listener(self.serving)
