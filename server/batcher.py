"""The dynamic batcher: fuses decoded images from every caller into model batches.

One asyncio task owns the queue. It waits for a first image, then fills the
batch until `max_batch_size` images or until the first image has waited
`max_wait_ms`; whatever queued up while the model was busy goes into the next
batch at once. Images whose caller left or whose deadline passed are dropped
before the forward pass. The forward pass runs on one dedicated thread, so the
event loop keeps serving I/O meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.errors import DeadlineExceeded, InferenceFailed, Unavailable
from server.metrics import Metrics
from server.model import BatchOutput

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], BatchOutput]


@dataclass(frozen=True)
class ItemOutput:
    """One image's model output and where its time went."""

    cls: np.ndarray
    mean: np.ndarray
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(eq=False)
class _Entry:
    pixels: np.ndarray
    future: asyncio.Future[ItemOutput]
    deadline: float | None  # time.monotonic() seconds
    enqueued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Queue, batch forming and per-image futures around one forward function."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        metrics: Metrics,
        probe: Callable[[], None] | None = None,
        probe_interval_s: float = 2.0,
        on_health: Callable[[bool], None] = lambda healthy: None,
        more_coming: Callable[[], bool] = lambda: True,
    ) -> None:
        self._forward = forward
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._metrics = metrics
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self._on_health = on_health
        self._more_coming = more_coming
        self._healthy = True
        self._prober: asyncio.Task[None] | None = None
        self._pending: collections.deque[_Entry] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stops batching; images still queued fail with `Unavailable`."""
        for task in (self._task, self._prober):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._prober = None
        while self._pending:
            entry = self._pending.popleft()
            if not entry.future.done():
                entry.future.set_exception(Unavailable("server is shutting down"))
        self._metrics.queue_depth.set(0)
        self._executor.shutdown(wait=True)

    async def submit(self, pixels: np.ndarray, deadline: float | None = None) -> ItemOutput:
        """Queues one decoded image and waits for its output.

        Cancelling the awaiting task cancels the entry, which is then dropped
        before it reaches the model.
        """
        if self._task is None or self._task.done():
            raise Unavailable("inference worker is not running")
        entry = _Entry(pixels, asyncio.get_running_loop().create_future(), deadline)
        self._pending.append(entry)
        self._metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return await entry.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._live(await self._collect())
            if not batch:
                continue
            pixels = np.stack([entry.pixels for entry in batch])
            started = time.monotonic()
            try:
                output = await loop.run_in_executor(self._executor, self._forward, pixels)
                if len(output.cls) != len(batch) or len(output.mean) != len(batch):
                    raise RuntimeError(f"model returned {len(output.cls)} outputs for {len(batch)} images")
            except asyncio.CancelledError:
                for entry in batch:
                    _settle(entry, exc=Unavailable("server is shutting down"))
                raise
            except Exception:
                log.exception("forward pass failed on a batch of %d images", len(batch))
                self._metrics.inference_failures.inc()
                for entry in batch:
                    _settle(entry, exc=InferenceFailed("inference failed on this image's batch; retry"))
                self._set_healthy(False)
                continue
            elapsed = time.monotonic() - started
            self._metrics.batch_size.observe(len(batch))
            self._metrics.inference_seconds.observe(elapsed)
            self._set_healthy(True)
            for row, entry in enumerate(batch):
                queued = started - entry.enqueued_at
                self._metrics.queue_seconds.observe(queued)
                _settle(entry, ItemOutput(output.cls[row], output.mean[row], queued, elapsed, len(batch)))

    async def _collect(self) -> list[_Entry]:
        """Waits for a first image, then up to max_wait after it for a full batch.

        It stops waiting early when `more_coming()` says no other image is on
        its way (a lone request is not held back for nothing).
        """
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        flush_at = self._pending[0].enqueued_at + self._max_wait_s
        while len(self._pending) < self._max_batch_size and self._more_coming():
            remaining = flush_at - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        count = min(len(self._pending), self._max_batch_size)
        batch = [self._pending.popleft() for _ in range(count)]
        self._metrics.queue_depth.set(len(self._pending))
        return batch

    def _live(self, batch: list[_Entry]) -> list[_Entry]:
        """Drops entries whose caller left or whose deadline passed."""
        now = time.monotonic()
        live = []
        for entry in batch:
            if entry.future.done():
                self._metrics.dropped.labels("cancelled").inc()
            elif entry.deadline is not None and now >= entry.deadline:
                self._metrics.dropped.labels("deadline").inc()
                _settle(entry, exc=DeadlineExceeded("deadline passed while the image was queued"))
            else:
                live.append(entry)
        return live

    def _set_healthy(self, healthy: bool) -> None:
        """Reports changes; while unhealthy, a prober retries a forward pass until one succeeds."""
        if healthy == self._healthy:
            return
        self._healthy = healthy
        self._on_health(healthy)
        if not healthy and self._probe is not None and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_healthy(), name="prober")

    async def _probe_until_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._healthy:
            try:
                await loop.run_in_executor(self._executor, self._probe)  # type: ignore[arg-type]
            except Exception as exc:
                log.warning("probe forward pass failed (%s); retrying in %.1f s", type(exc).__name__,
                            self._probe_interval_s)  # fmt: skip
                await asyncio.sleep(self._probe_interval_s)
            else:
                self._set_healthy(True)


def _settle(entry: _Entry, result: ItemOutput | None = None, exc: Exception | None = None) -> None:
    if entry.future.done():
        return
    if exc is not None:
        entry.future.set_exception(exc)
    else:
        entry.future.set_result(result)  # type: ignore[arg-type]

