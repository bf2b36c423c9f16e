"""The service API shared by every transport: validate, decode, submit, pool.

The gRPC servicer and the RunPod handler both call `EmbedService.embed`. It
checks the request, admits it against the bounds on images, bytes and time
(server/admission.py, timed by server/throughput.py), decodes its images on
the shared decode pool (so one bad image fails alone, before batching), hands
the pixels to the batcher chunk by chunk and pools the model output per
image. A request is one `_Request` object that both the decode pool and the
batcher report to, and one future its caller awaits; at its deadline, what
is not answered yet is answered DEADLINE_EXCEEDED and its queued work dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from server.admission import Admission, Cost
from server.batcher import Batcher, ItemOutput
from server.config import Settings
from server.deadlines import left_at_deadline
from server.decode.budget import PixelBudget
from server.decode.decoder import Decoded
from server.decode.pool import DecodeJob, DecodePool, Lane
from server.decode.setup import Setup
from server.decode.worker import ProcessDecoder
from server.errors import DeadlineExceeded, EmbedError, Internal, InvalidRequest, Overloaded, Unavailable
from server.geometry import Geometry
from server.info import ServiceInfo
from server.metrics import Metrics
from server.model import ModelRunner, Pooling, pool
from server.preprocess import ImageLimits, decode
from server.resize import placement
from server.runtime import MemoryPolicy
from server.throughput import Estimate, Throughput
from server.tokens import PatchTokens, TokenOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedOptions:
    """How a request's images are answered: the pooled embedding, and their patch tokens if `patch_tokens`."""

    pooling: Pooling = Pooling.CLS
    normalize: bool = False
    patch_tokens: TokenOptions | None = None


@dataclass(frozen=True)
class ImageResult:
    """One image's answer: an embedding, or the error that stopped it."""

    embedding: np.ndarray | None = None
    error: EmbedError | None = None
    preprocess_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    patch_tokens: PatchTokens | None = None


def _decode_pool(settings: Settings, geometry: Geometry, resize_on: str) -> DecodePool:
    """The decode workers the settings ask for, sharing one bound on full-size pixels.

    With the resize on the device the workers hand back full-size pixels,
    and they count against that bound until the runner has resized them.
    """
    limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
    budget = PixelBudget(settings.max_decode_pixels)
    resize, fast = resize_on == "workers", settings.decode == "fast"
    full_size = None if resize else budget
    if settings.decode_in == "threads":
        decode_one = partial(decode, limits=limits, geometry=geometry, budget=budget, resize=resize, fast=fast)
        return DecodePool.in_threads(decode_one, settings.decode_workers, full_size)
    setup = Setup.of(limits, geometry, settings.idle_trim_s, settings.decode_timeout_s, resize, fast)
    return DecodePool([partial(ProcessDecoder, setup, budget)] * settings.decode_workers, full_size=full_size)


class _Request:
    """One call's images between decoding, the batcher and the answer; a sink for both."""

    def __init__(self, count: int, options: EmbedOptions, deadline: float | None, service: EmbedService) -> None:
        self.options = options
        self.deadline = deadline
        self.results: list[ImageResult | None] = [None] * count
        self.preprocess_s = [0.0] * count
        self.unsettled = count
        self.queued = 0  # images handed to the batcher (it counts its own drops)
        self.answered_early = 0  # images answered before the batcher (refused by decoding, say)
        self.started = time.monotonic()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._service = service

    def decoded(self, start: int, chunk: list[Decoded]) -> None:
        """A chunk back from the decode pool: errors are answers, pixels go to the batcher."""
        if self.done.done():
            return
        elapsed = time.monotonic() - self.started
        pixels = []
        for index, item in enumerate(chunk, start):
            self.preprocess_s[index] = elapsed
            if isinstance(item, EmbedError):
                self.answered_early += 1
                self.settle(index, item)
            else:
                pixels.append((index, item))
        self._service.metrics.preprocess_seconds.observe(elapsed)
        if not pixels:
            return
        try:
            self.queued += self._service.batcher.put(pixels, self, self.deadline, self.options.patch_tokens)
        except EmbedError as exc:
            self.answered_early += len(pixels)
            for index, _ in pixels:
                self.settle(index, exc)

    def wanted(self) -> bool:
        return not self.done.done()

    def expire(self) -> None:
        """The deadline passed: every image not answered yet is answered DEADLINE_EXCEEDED."""
        for index, result in enumerate(self.results):
            if result is None:
                self.settle(index, DeadlineExceeded("deadline passed before this image was embedded"))

    def settle(self, index: int, result: ItemOutput | EmbedError) -> None:
        if self.results[index] is not None or self.done.done():
            return
        if isinstance(result, EmbedError):
            answer = ImageResult(error=result, preprocess_s=self.preprocess_s[index])
        else:
            answer = self._pooled(index, result)
        self.results[index] = answer
        self.unsettled -= 1
        if self.unsettled == 0:
            self.done.set_result(None)

    def _pooled(self, index: int, out: ItemOutput) -> ImageResult:
        try:
            embedding = pool(out.cls, out.mean, self.options.pooling, self.options.normalize)
        except Exception:
            log.exception("pooling failed on image %d", index)
            return ImageResult(error=Internal("internal error while pooling this image's embedding"))
        if self.options.patch_tokens is not None and out.patches is None:
            log.error("image %d asked for patch tokens and the model returned none", index)
            return ImageResult(error=Internal("internal error: the model returned no patch tokens for this image"))
        return ImageResult(embedding, None, self.preprocess_s[index], out.queue_s, out.inference_s, out.patches)


class EmbedService:
    """One loaded model behind a dynamic batcher, shared by every caller."""

    def __init__(self, settings: Settings, runner: ModelRunner, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics or Metrics()
        self.resize_on = placement(settings.resize_on, runner.device)
        self._decoder = _decode_pool(settings, runner.norm.geometry, self.resize_on)
        self.batcher = Batcher(
            partial(runner.embed, full_size=True) if self.resize_on == "device" else runner.embed,
            batch_limit=partial(runner.batch_limit, settings.max_batch_size),
            max_wait_ms=settings.max_wait_ms,
            metrics=self.metrics,
            compute=runner.compute,
            forward_timeout_s=settings.forward_timeout_s,
            probe=runner.warmup,
            probe_interval_s=settings.probe_interval_s,
            on_health=self._set_healthy,
            coming=lambda: self._decoder.pending,
            backlog_wait_ms=settings.backlog_wait_ms,
        )
        self.throughput = Throughput(self.batcher.forward_times, self._decoder.times)
        self._admission = Admission(
            settings.max_queue_images, settings.max_inflight_bytes, settings.max_queue_s, self._estimate
        )
        self.metrics.queued_work_seconds.set_function(self._admission.queued_seconds)
        self._memory = MemoryPolicy(settings.idle_trim_s, settings.max_inflight_bytes)
        self._ready = False
        self._healthy = True
        self._draining = False
        self._health_listeners: list[Callable[[bool], None]] = []
        self.info = ServiceInfo.of(settings, runner)
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
        """Starts the batcher and warms the model up; only then does it serve.

        One more pass of a single image, timed, is admission's first measure
        of speed; the batches that follow replace it.
        """
        self.batcher.start()
        await asyncio.wrap_future(self.runner.compute.submit(self.runner.warmup))
        self.batcher.forward_times.observe(1, await asyncio.wrap_future(self.runner.compute.submit(self._timed_pass)))
        self._ready = True
        self._notify()
        log.info("engine ready: batches of up to %d, max wait %.1f ms (%.1f ms with a backlog), queue bound %d images "
                 "and %g s, %d decode workers (%s), resize on %s, decode %s", self.info.max_batch_size,
                 self.settings.max_wait_ms, max(self.settings.max_wait_ms, self.settings.backlog_wait_ms),
                 self.settings.max_queue_images, self.settings.max_queue_s, self.settings.decode_workers,
                 self.settings.decode_in, self.resize_on, self.settings.decode)  # fmt: skip

    def _timed_pass(self) -> float:
        size = self.runner.image_size
        started = time.perf_counter()
        self.runner.embed([np.zeros((size, size), dtype=np.uint8)])
        return time.perf_counter() - started

    def _estimate(self, ahead: int, own: int) -> Estimate | None:
        """How long until a request of `own` images, behind `ahead` accepted ones, is answered."""
        decoding = self._decoder.backlog()
        limit = self.runner.batch_limit(self.settings.max_batch_size)
        return self.throughput.estimate(ahead, own, decoding.images, decoding.callers, limit, taken=decoding.taken)

    @staticmethod
    def new_lane() -> Lane:
        """A decode lane for a caller whose requests go in order (a stream): one turn for all of them."""
        return Lane()

    def begin_drain(self) -> None:
        """Refuses new work with `Unavailable`; work already accepted goes on."""
        self._draining = True
        self._notify()

    async def close(self) -> None:
        await self.batcher.close()
        self._decoder.close()
        self._memory.close()

    async def embed(
        self,
        images: Sequence[bytes],
        options: EmbedOptions,
        deadline: float | None = None,
        wait: bool = False,
        nbytes: int | None = None,
        lane: Lane | None = None,
    ) -> list[ImageResult]:
        """Embeds the images of one request, in order; per-image failures are in the results (see `embedding`)."""
        async with self.embedding(images, options, deadline, wait, nbytes, lane) as results:
            return results

    @contextlib.asynccontextmanager
    async def embedding(
        self,
        images: Sequence[bytes],
        options: EmbedOptions,
        deadline: float | None = None,
        wait: bool = False,
        nbytes: int | None = None,
        lane: Lane | None = None,
        answer_bytes: int = 0,
    ) -> AsyncIterator[list[ImageResult]]:
        """Embeds the images of one request, in order, and holds them in the work in flight while the block
        runs: a transport that builds and writes its answer there has the answer counted too, as
        `answer_bytes` per image. Per-image failures are in the results.

        Raises a request-level `EmbedError` when the request cannot be taken
        at all: malformed, the engine draining or stuck, or over the bounds on
        work in flight (unless `wait`, which queues for capacity instead).
        `deadline` is a `time.monotonic()` instant; `nbytes`, the request's
        encoded size when the caller knows it without reading every image;
        `lane` (from `new_lane`), shared by the requests of one caller that
        are decoded in order and take one turn among the callers. A request
        that would not be answered before its deadline is refused (`wait`:
        waits for room until then, or `max_queue_s`); at the deadline the
        images not answered yet are answered `DeadlineExceeded`.
        """
        if self._draining or not self._ready:
            raise Unavailable("server is draining" if self._draining else "server is not ready yet")
        self.batcher.accepting()
        if not images:
            raise InvalidRequest("request has no images")
        limit = self.settings.max_images_per_request
        if len(images) > limit:
            raise InvalidRequest(f"request has {len(images)} images, over the limit of {limit} per request")
        received = nbytes if nbytes is not None else sum(len(data) for data in images)
        self._memory.received(received)  # also before a refusal: its body was received and parsed
        each = self._check_patch_tokens(len(images), options) + answer_bytes
        cost = Cost(len(images), received + len(images) * each)
        await self._admit(cost, deadline, wait)
        self._in_flight_changed()
        request = _Request(len(images), options, deadline, self)
        job: DecodeJob | None = None
        try:
            job = self._decoder.submit(images, request.decoded, lane)
            if deadline is None:
                await request.done
            elif not (await asyncio.wait((request.done,), timeout=max(0.0, deadline - time.monotonic())))[0]:
                self._drop(request, job, "deadline")
                request.expire()
            results: list[ImageResult] = request.results  # type: ignore[assignment]
            outcomes = collections.Counter(type(result.error).__name__ if result.error else "ok" for result in results)
            for outcome, count in outcomes.items():
                self.metrics.images.labels(outcome).inc(count)
            yield results
        except asyncio.CancelledError:
            if not request.done.done():
                self._drop(request, job, "deadline" if left_at_deadline(deadline, time.monotonic()) else "cancelled")
                request.done.cancel()
            raise
        finally:
            self._admission.release(cost)
            self._in_flight_changed()

    def body_received(self, nbytes: int) -> None:
        """A transport read a request body of `nbytes`, taken or refused: the memory policy counts it."""
        self._memory.received(nbytes)

    def patch_token_bytes(self, options: EmbedOptions) -> int:
        """Bytes of one image's patch tokens in the answer to `options` (0 when not asked)."""
        return 0 if options.patch_tokens is None else self.runner.patch_token_bytes(options.patch_tokens)

    def _check_patch_tokens(self, count: int, options: EmbedOptions) -> int:
        """Bytes of one image's patch tokens (0 when not asked); refuses a request whose tokens alone
        would pass the message limit, which bounds a response as it bounds a request."""
        each = self.patch_token_bytes(options)
        if not each:
            return 0
        limit = self.settings.max_request_bytes
        if count * each > limit:
            dtype = options.patch_tokens.dtype
            half = "" if dtype != "float32" else ", or ask for float16 or bfloat16 (half the size)"
            raise InvalidRequest(
                f"the patch tokens of {count} images are {count * each} bytes ({each} each in {dtype}), over the "
                f"response limit of {limit} bytes (max_request_bytes): send at most {limit // each} images per "
                f"request{half}"
            )
        return each

    async def _admit(self, cost: Cost, deadline: float | None, wait: bool) -> None:
        """Takes `cost` into the work in flight, or raises `Overloaded` (counted by the bound that refused it)."""
        try:
            if wait:
                room_by = time.monotonic() + self.settings.max_queue_s
                await self._admission.acquire(cost, room_by if deadline is None else min(deadline, room_by))
            else:
                self._admission.try_acquire(cost, deadline)
        except Overloaded as exc:
            self.metrics.refused.labels(exc.reason).inc()
            raise

    def _drop(self, request: _Request, job: DecodeJob | None, reason: str) -> None:
        """A call that ends before all its images are answered: its queued work is dropped, not computed."""
        if job is not None:
            self._decoder.cancel(job)
        self.batcher.discard(request, reason)
        never_queued = len(request.results) - request.queued - request.answered_early
        if never_queued > 0:
            self.metrics.dropped.labels(reason).inc(never_queued)

    def _in_flight_changed(self) -> None:
        self.metrics.in_flight.set(self._admission.images)
        self._memory.in_flight(self._admission.nbytes)

    def _set_healthy(self, healthy: bool) -> None:
        if healthy != self._healthy:
            log.warning("inference worker is %s", "healthy again" if healthy else "failing: NOT_SERVING")
            self._healthy = healthy
            self._notify()

    def _notify(self) -> None:
        for listener in self._health_listeners:
            listener(self.serving)
