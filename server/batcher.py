"""The dynamic batcher: fuses decoded images from every caller into model batches.

One asyncio task owns the queue. It waits for a first image, then fills the
batch until `max_batch_size` images or until the first image has waited
`max_wait_ms`, or `backlog_wait_ms` when enough images to fill the batch are
already being decoded (the host is the bottleneck then, and a full batch
costs it less per image); it waits for nothing when no image is on its way.
Whatever queued up while the model was busy goes into the next batch at once.
Images whose caller left are taken out of the queue at once (`discard`), so
they neither fill a batch nor count toward the queue; those whose deadline
passed are dropped before the forward pass. The forward pass runs on the model's compute thread, so the
event loop keeps serving I/O meanwhile; one that takes longer than
`forward_timeout_s` fails its images and everything queued. Health, stalls
and probing are the `Supervisor`'s (server/supervision.py).

Callers hand images over in chunks (`put`), each with a `Sink` that takes
their outputs back: one object per request instead of a future per image.
Every forward pass's time is recorded in `forward_times`, the engine's clock
for admission (server/throughput.py). It is timed on the compute thread: the
event loop can be held up (a large request's body is copied and parsed on
it), and admission must not read its delays as a slow model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from server.deadlines import left_at_deadline
from server.errors import DeadlineExceeded, EmbedError, InferenceFailed, Unavailable
from server.metrics import Metrics
from server.model import BatchOutput, Tokens
from server.runtime import ComputeThread
from server.supervision import Supervisor
from server.throughput import ForwardTimes
from server.tokens import PatchTokens, TokenOptions

log = logging.getLogger(__name__)

Forward = Callable[..., BatchOutput]
"""`forward(pixels)`, or `forward(pixels, tokens)` when an image of the batch asks for its patch tokens:
a batch's images, each uint8 [S, S], in; the model assembles them where they go (server/staging.py)."""


@dataclass(frozen=True)
class ItemOutput:
    """One image's model output and where its time went."""

    cls: np.ndarray
    mean: np.ndarray
    queue_s: float
    inference_s: float
    batch_size: int
    patches: PatchTokens | None = None


class Sink(Protocol):
    """Where a request's images' outputs go; the batcher calls it on the event loop."""

    def wanted(self) -> bool:
        """False once the caller has left: its queued images are dropped."""
        ...

    def settle(self, index: int, result: ItemOutput | EmbedError) -> None: ...


@dataclass(frozen=True)
class _Pass:
    """A forward pass as the compute thread ran it: the batch's rows it computed, when it began
    (`time.monotonic()`) and how long it took."""

    rows: list[int]
    output: BatchOutput | None
    started: float = 0.0
    seconds: float = 0.0


@dataclass(eq=False)
class _Entry:
    pixels: np.ndarray
    sink: Sink
    index: int
    deadline: float | None  # time.monotonic() seconds
    enqueued_at: float = field(default_factory=time.monotonic)
    tokens: TokenOptions | None = None


class _FutureSink:
    """A sink for one image, awaited as a future (`Batcher.submit`)."""

    def __init__(self) -> None:
        self.future: asyncio.Future[ItemOutput] = asyncio.get_running_loop().create_future()

    def wanted(self) -> bool:
        return not self.future.done()

    def settle(self, index: int, result: ItemOutput | EmbedError) -> None:
        if self.future.done():
            return
        if isinstance(result, EmbedError):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


class Batcher:
    """Queue and batch forming around one forward function, watched by a `Supervisor`."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_size: int = 16,
        batch_limit: Callable[[], int] | None = None,
        max_wait_ms: float,
        metrics: Metrics,
        compute: ComputeThread | None = None,
        forward_timeout_s: float = 120.0,
        probe: Callable[[], None] | None = None,
        probe_interval_s: float = 2.0,
        on_health: Callable[[bool], None] = lambda healthy: None,
        coming: Callable[[], int] = lambda: 1,
        backlog_wait_ms: float = 0.0,
        forward_times: ForwardTimes | None = None,
    ) -> None:
        self._forward = forward
        # Read each time a batch is formed: the runner lowers it after running out of device memory.
        self._batch_limit = batch_limit or (lambda: max_batch_size)
        self._max_wait_s = max_wait_ms / 1000.0
        self._backlog_wait_s = max(max_wait_ms, backlog_wait_ms) / 1000.0
        self._metrics = metrics
        self._own_compute = compute is None
        self._compute = compute or ComputeThread("forward")
        self._forward_timeout_s = forward_timeout_s
        self._coming = coming
        self.forward_times = forward_times or ForwardTimes()
        self.supervisor = Supervisor(self._compute, probe, probe_interval_s, on_health)
        self._pending: collections.deque[_Entry] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._waiting_batch: list[_Entry] | None = None  # formed and queued behind the running one
        self._forming: list[_Entry] = []  # taken from the queue, not yet handed to a batch task

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")
        self._task.add_done_callback(self._on_task_done)

    async def close(self) -> None:
        """Stops batching; images still queued fail with `Unavailable`."""
        await self.supervisor.close()
        for task in (self._task, *self._batches):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = None
        self._fail_pending(Unavailable("server is shutting down"))
        if self._own_compute:
            self._compute.close()

    def accepting(self) -> None:
        """Raises `Unavailable` when images put now could not be run."""
        if self._task is None or self._task.done():
            raise Unavailable("inference worker is not running")
        if self.supervisor.stalled:
            raise Unavailable("inference is stuck on an earlier batch; retry on another server")

    def put(
        self,
        items: Iterable[tuple[int, np.ndarray]],
        sink: Sink,
        deadline: float | None,
        tokens: TokenOptions | None = None,
    ) -> int:
        """Queues a chunk of one request's images, (index, pixels) each, asking for their patch tokens
        when `tokens`; returns how many."""
        self.accepting()
        now = time.monotonic()
        before = len(self._pending)
        self._pending.extend(_Entry(pixels, sink, index, deadline, now, tokens) for index, pixels in items)
        self._metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return len(self._pending) - before

    async def submit(self, pixels: np.ndarray, deadline: float | None = None) -> ItemOutput:
        """Queues one image and waits for its output; cancelling the wait drops it before the model."""
        sink = _FutureSink()
        self.put([(0, pixels)], sink, deadline)
        return await sink.future

    async def _run(self) -> None:
        """Two batches in flight: while one runs, the next is formed, stacked and queued on the
        compute thread, so the model goes from one batch to the next without waiting for this loop."""
        running: asyncio.Task[None] | None = None
        while True:
            self._forming = await self._collect(running)
            batch, self._forming = self._forming, []
            if not batch:
                continue
            queued = asyncio.get_running_loop().create_task(self._run_batch(batch, running), name="batch")
            del batch  # the task holds it; this loop must not while it waits for the next batch (full-size
            # pixels hold the pixel budget until freed, and the next batch's decodes may wait for it)
            queued.add_done_callback(self._batch_done)
            self._batches.add(queued)
            if running is not None:
                await asyncio.wait([running])
            running = queued

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._wakeup.set()  # the model is free: a partial batch can go now

    async def _run_batch(self, batch: list[_Entry], before: asyncio.Task[None] | None) -> None:
        running = self._compute.submit(self._forward_wanted, batch)
        try:
            if before is not None:
                self._waiting_batch = batch
                await asyncio.wait([before])
                self._waiting_batch = None
            done = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running)), self._forward_timeout_s)
        except asyncio.CancelledError:
            _settle_all(batch, Unavailable("server is shutting down"))
            raise
        except TimeoutError:
            self._fail_overdue(batch)
            await self.supervisor.wait_out(running)
            return
        except Exception:
            log.exception("forward pass failed on a batch of %d images", len(batch))
            self._metrics.inference_failures.inc()
            _settle_all(batch, InferenceFailed("inference failed on this image's batch; retry"))
            self.supervisor.failed()
            return
        rows, output, elapsed = done.rows, done.output, done.seconds
        if len(rows) < len(batch):  # count and answer those whose caller left while the batch waited
            kept, now = set(rows), time.monotonic()
            for row, entry in enumerate(batch):
                if row not in kept:
                    self._is_live(entry, now)
        if output is None:
            return
        self.forward_times.observe(len(rows), elapsed)
        self._metrics.batch_size.observe(len(rows))
        self._metrics.inference_seconds.observe(elapsed)
        self.supervisor.passed()
        for out_row, row in enumerate(rows):
            entry = batch[row]
            queued = done.started - entry.enqueued_at
            self._metrics.queue_seconds.observe(queued)
            patches = output.patches[out_row] if output.patches is not None else None
            item = ItemOutput(output.cls[out_row], output.mean[out_row], queued, elapsed, len(rows), patches)
            entry.sink.settle(entry.index, item)

    def _forward_wanted(self, batch: list[_Entry]) -> _Pass:
        """On the compute thread, as the batch starts: the forward pass of the images still wanted.

        A batch can wait behind the running one; images whose caller left or
        whose deadline passed meanwhile are left out here, not computed.
        """
        now = time.monotonic()
        rows = [row for row, e in enumerate(batch) if e.sink.wanted() and (e.deadline is None or now < e.deadline)]
        if not rows:
            return _Pass(rows, None)
        pixels = [batch[row].pixels for row in rows]
        tokens: Tokens = [batch[row].tokens for row in rows]
        started = time.monotonic()
        output = self._forward(pixels, tokens) if any(tokens) else self._forward(pixels)  # type: ignore[arg-type]
        seconds = time.monotonic() - started
        if len(output.cls) != len(rows) or len(output.mean) != len(rows):
            raise RuntimeError(f"model returned {len(output.cls)} outputs for {len(rows)} images")
        return _Pass(rows, output, started, seconds)

    def _fail_overdue(self, batch: list[_Entry]) -> None:
        """A forward pass overran its timeout: its images, those queued and the batch waiting
        behind it fail now; the supervisor then refuses new images until it returns."""
        log.error("forward pass of %d images still running after %.0f s: NOT_SERVING until it returns",
                  len(batch), self._forward_timeout_s)  # fmt: skip
        self._metrics.inference_failures.inc()
        message = f"inference did not finish within {self._forward_timeout_s:g} s; retry on another server"
        _settle_all(batch, Unavailable(message))
        self._fail_pending(Unavailable(message))
        if self._waiting_batch is not None:
            _settle_all(self._waiting_batch, Unavailable(message))

    async def _collect(self, running: asyncio.Task[None] | None) -> list[_Entry]:
        """Waits for a first image, then for a full batch: as long as the model is busy with
        `running`, else up to max_wait after the first image (backlog_wait when `coming()`
        images, those on their way from decoding, would fill it). Returns the live images taken.

        It stops waiting when nothing is on its way (a lone request is not held back for nothing).
        """
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        first_at = self._pending[0].enqueued_at
        limit = self._batch_limit()
        while len(self._pending) < limit:
            if running is not None and not running.done():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            coming = self._coming()
            if coming <= 0:
                break
            fills = coming >= limit - len(self._pending)
            remaining = first_at + (self._backlog_wait_s if fills else self._max_wait_s) - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        batch: list[_Entry] = []
        now = time.monotonic()
        while self._pending and len(batch) < limit:
            entry = self._pending.popleft()
            if self._is_live(entry, now):
                batch.append(entry)
        self._metrics.queue_depth.set(len(self._pending))
        return batch

    def discard(self, sink: Sink, reason: str) -> int:
        """Takes a sink's queued images out of the queue (its caller left); returns how many.

        `reason` (cancelled, deadline) labels them in `dinov2_dropped_images_total`.
        """
        kept = [entry for entry in self._pending if entry.sink is not sink]
        dropped = len(self._pending) - len(kept)
        if dropped:
            self._pending.clear()
            self._pending.extend(kept)
            self._metrics.dropped.labels(reason).inc(dropped)
            self._metrics.queue_depth.set(len(self._pending))
        return dropped

    def _is_live(self, entry: _Entry, now: float) -> bool:
        """False for an entry whose caller left or whose deadline passed (it is counted, and answered if wanted)."""
        if not entry.sink.wanted():
            self._metrics.dropped.labels("deadline" if left_at_deadline(entry.deadline, now) else "cancelled").inc()
            return False
        if entry.deadline is not None and now >= entry.deadline:
            self._metrics.dropped.labels("deadline").inc()
            entry.sink.settle(entry.index, DeadlineExceeded("deadline passed while the image was queued"))
            return False
        return True

    def _fail_pending(self, error: EmbedError) -> None:
        while self._pending:
            entry = self._pending.popleft()
            entry.sink.settle(entry.index, error)
        self._metrics.queue_depth.set(0)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """A batcher that died (not stopped) fails its images and is reported to the supervisor."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        stopped = Unavailable("inference worker stopped; retry on another server")
        _settle_all(self._forming, stopped)
        self._fail_pending(stopped)
        self.supervisor.died(error)


def _settle_all(batch: list[_Entry], error: EmbedError) -> None:
    for entry in batch:
        entry.sink.settle(entry.index, error)
