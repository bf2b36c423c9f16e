"""The decode pool: fair between callers, handed back to the event loop in chunks.

Each request's images form a job, and each caller's jobs a lane: a unary
call is a lane of its own, a stream's requests share one, in order. Workers
take turns between lanes (round robin), so a caller with many expensive
images cannot hold every worker while a small call waits, and a stream's
first request is done first. A worker takes a chunk of a lane's first job
sized to about `slice_s` of work (from the lane's decode times so far),
decodes it, and hands the whole chunk back with one event-loop wake-up. A job
whose caller left is dropped, with whatever of it was still queued.

Each pool thread makes its own `ChunkDecoder` and decodes through it: a
child process (`server.decode.worker.ProcessDecoder`, the default: decoding
runs in parallel over the CPUs) or the thread itself (`ThreadDecoder`). A
thread waiting for work holds no reference to the last job it decoded, so an
answered or cancelled request's bytes are freed at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.decode.budget import PixelBudget
from server.decode.decoder import ChunkDecoder, Decoded, ThreadDecoder
from server.errors import Internal
from server.runtime import name_os_thread
from server.throughput import DecodeTimes

log = logging.getLogger(__name__)

Deliver = Callable[[int, list[Decoded]], None]
"""Called on the job's event loop with a chunk: the index of its first image and the results."""

MAX_CHUNK = 32


@dataclass(eq=False)
class DecodeJob:
    """One request's images, as the workers see it."""

    images: Sequence[bytes]
    deliver: Deliver
    loop: asyncio.AbstractEventLoop
    lane: Lane
    next_index: int = 0
    cancelled: bool = False

    @property
    def queued(self) -> int:
        """Images not yet taken by a worker."""
        return len(self.images) - self.next_index


@dataclass(frozen=True)
class Backlog:
    """The decoding ahead of a new request: images taken by a worker (decoded before any new
    request's), images queued, and the callers (lanes) they are queued for, who take turns."""

    taken: int
    queued: int
    callers: int

    @property
    def images(self) -> int:
        return self.taken + self.queued


@dataclass(frozen=True)
class _InFlight:
    """A chunk sent to a pool thread's decoder, waiting for its results."""

    job: DecodeJob
    start: int
    count: int
    sent_at: float


@dataclass(eq=False)
class Lane:
    """One caller's jobs, decoded in order; it takes one turn among the callers.

    A stream keeps one for its life, so its cost estimate carries over from
    one request to the next.
    """

    jobs: collections.deque[DecodeJob] = field(default_factory=collections.deque)
    seconds_per_image: float = 0.0


class DecodePool:
    """One thread per decoder, taking chunks of every caller's jobs in turn.

    Each thread calls its factory in `decoders` to make the decoder it uses,
    so child processes start side by side, each tied to its thread.
    """

    def __init__(
        self,
        decoders: Sequence[Callable[[], ChunkDecoder]],
        slice_s: float = 0.02,
        full_size: PixelBudget | None = None,
    ) -> None:
        self._slice_s = slice_s
        self._full_size = full_size  # images come back at full size: counted here until freed
        self.times = DecodeTimes(len(decoders))  # admission's estimate of the decoding ahead
        self._turns: collections.deque[Lane] = collections.deque()  # the lanes with queued jobs
        self._cond = threading.Condition()
        self._closed = False
        self.busy_images = 0  # images taken by a worker and not yet handed back
        self._threads = [
            threading.Thread(target=self._work, args=(decoder,), name=f"decode-{n}", daemon=True)
            for n, decoder in enumerate(decoders)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Images queued or being decoded, over all jobs: more images are on their way to the batcher."""
        return self.backlog().images

    def backlog(self) -> Backlog:
        with self._cond:
            queued = sum(job.queued for lane in self._turns for job in lane.jobs)
            return Backlog(self.busy_images, queued, len(self._turns))

    def submit(self, images: Sequence[bytes], deliver: Deliver, lane: Lane | None = None) -> DecodeJob:
        """Queues a request's images; `deliver` gets them back in chunks, on the calling loop.

        Requests in the same `lane` are decoded one after the other, in the
        order submitted, and share its turn; without one, the request is a
        caller of its own.
        """
        job = DecodeJob(images, deliver, asyncio.get_running_loop(), lane or Lane())
        if not images:
            return job
        with self._cond:
            if self._closed:
                raise RuntimeError("decode pool is closed")
            if not job.lane.jobs:
                self._turns.append(job.lane)
            job.lane.jobs.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: DecodeJob) -> int:
        """Drops a job's queued images (those being decoded are discarded when done); returns how many."""
        with self._cond:
            job.cancelled = True
            dropped = job.queued
            job.next_index = len(job.images)
            lane = job.lane
            if job in lane.jobs:
                lane.jobs.remove(job)
                if not lane.jobs and lane in self._turns:  # after close() no lane has a turn
                    self._turns.remove(lane)
        return dropped

    @classmethod
    def in_threads(
        cls, decode_one: Callable[[bytes], np.ndarray], workers: int, full_size: PixelBudget | None = None
    ) -> DecodePool:
        return cls([lambda: ThreadDecoder(decode_one)] * workers, full_size=full_size)

    def close(self) -> None:
        """Stops taking work; each decoder closes once its chunk in progress is handed back."""
        with self._cond:
            self._closed = True
            self._turns.clear()
            self._cond.notify_all()

    def _take(self, wait: bool) -> tuple[DecodeJob, int, int] | None:
        """The next lane in turn and a chunk of its first job: (job, first index, count).

        None once closed, or when there is no work and not `wait`.
        """
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: self._turns or self._closed)
            if self._closed or not self._turns:
                return None
            lane = self._turns.popleft()
            job = lane.jobs[0]
            if lane.seconds_per_image > 0:
                count = max(1, min(int(self._slice_s / lane.seconds_per_image), MAX_CHUNK, job.queued))
            else:
                count = 1  # a lane's first chunk measures what one of its images costs
            start = job.next_index
            job.next_index += count
            if not job.queued:
                lane.jobs.popleft()
            if lane.jobs:
                self._turns.append(lane)  # back of the line: the other callers go first
            self.busy_images += count
            return job, start, count

    def _work(self, make_decoder: Callable[[], ChunkDecoder]) -> None:
        """Keeps up to `decoder.depth` chunks in flight, hands each back as its results come.

        Jobs are referenced only from `in_flight` and the helpers' frames, so
        none is kept alive while the thread waits for the next one.
        """
        name_os_thread(threading.current_thread().name)
        decoder = make_decoder()
        in_flight: collections.deque[_InFlight] = collections.deque()
        last_received = 0.0
        try:
            while True:
                self._fill(decoder, in_flight)
                if not in_flight:
                    return  # closed
                last_received = self._hand_back_oldest(decoder, in_flight, last_received)
        finally:
            decoder.close()

    def _fill(self, decoder: ChunkDecoder, in_flight: collections.deque[_InFlight]) -> None:
        """Sends chunks until `decoder.depth` are in flight; waits for work only when none is."""
        while len(in_flight) < decoder.depth and (taken := self._take(wait=not in_flight)) is not None:
            job, start, count = taken
            decoder.send([job.images[index] for index in range(start, start + count)])
            in_flight.append(_InFlight(job, start, count, time.perf_counter()))

    def _hand_back_oldest(self, decoder: ChunkDecoder, in_flight: collections.deque[_InFlight], last: float) -> float:
        """Receives the oldest chunk's results and hands them back; returns when they came."""
        chunk = in_flight.popleft()
        results = self._receive(decoder, chunk.count)
        if self._full_size is not None:
            self._full_size.hold_while_alive([result for result in results if isinstance(result, np.ndarray)])
        received = time.perf_counter()
        # the decoder started on this chunk when it was sent or when it handed back the one before
        self._hand_back(chunk.job, chunk.start, chunk.count, results, received - max(chunk.sent_at, last))
        return received

    @staticmethod
    def _receive(decoder: ChunkDecoder, count: int) -> list[Decoded]:
        try:
            return decoder.receive()
        except Exception:
            log.exception("decode worker failed on a chunk of %d images", count)
            return [Internal("internal error while decoding this image") for _ in range(count)]

    def _hand_back(self, job: DecodeJob, start: int, count: int, results: list[Decoded], seconds: float) -> None:
        with self._cond:
            job.lane.seconds_per_image = seconds / count
            self.times.observe(count, seconds)
        if not job.cancelled:
            try:
                job.loop.call_soon_threadsafe(self._deliver, job, start, count, results)
                return
            except RuntimeError:  # the caller's loop is closed: nobody waits
                pass
        with self._cond:
            self.busy_images -= count

    def _deliver(self, job: DecodeJob, start: int, count: int, results: list[Decoded]) -> None:
        """On the job's loop: the chunk stops counting as pending as its images reach the caller,
        in one step, so `pending` never reads 0 while decoded images are on their way."""
        with self._cond:
            self.busy_images -= count
        if not job.cancelled:
            job.deliver(start, results)
