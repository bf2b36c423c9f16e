"""The decode pool: fair between callers, handed back to the event loop in chunks.

Each request's images form a job, and each caller's jobs a lane: a unary
call is a lane of its own, a stream's requests share one, in order. Workers
take turns between lanes (round robin), so a caller with many expensive
images cannot hold every worker while a small call waits, and a stream's
first request is done first. A worker takes a chunk of a lane's first job
sized to about `slice_s` of work (from the lane's decode times so far),
decodes it, and hands the whole chunk back with one event-loop wake-up. A job
whose caller left is dropped, with whatever of it was still queued.

Each pool thread decodes through a `ChunkDecoder`: a child process of its own
(`server.decode_worker.ProcessDecoder`, the default: decoding runs in
parallel over the CPUs) or the thread itself (`ThreadDecoder`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from server.errors import EmbedError, Internal, detached
from server.runtime import name_os_thread
from server.throughput import DecodeTimes

log = logging.getLogger(__name__)

Decoded = np.ndarray | EmbedError
"""One image's decode result: uint8 pixels, or the (detached) error that refused it."""

Deliver = Callable[[int, list[Decoded]], None]
"""Called on the job's event loop with a chunk: the index of its first image and the results."""

MAX_CHUNK = 32


def decode_safely(decode_one: Callable[[bytes], np.ndarray], data: bytes) -> tuple[Decoded, str | None]:
    """One image's result; a failure of any kind stays this image's, never the call's.

    An unexpected failure also returns its traceback, for the caller to log
    (a decode worker process sends it to the server, which logs it).
    """
    try:
        return decode_one(data), None
    except EmbedError as exc:
        return detached(exc), None
    except Exception:
        return Internal("internal error while decoding this image"), traceback.format_exc(limit=8)


class ChunkDecoder(Protocol):
    """Decodes chunks of images for one pool thread; every failure stays its image's result.

    Up to `depth` chunks are sent before the first one's results are received.
    """

    depth: int

    def send(self, images: list[bytes]) -> None: ...

    def receive(self) -> list[Decoded]:
        """The results of the oldest chunk sent, in order."""
        ...

    def close(self) -> None: ...


class ThreadDecoder:
    """Decodes on the calling pool thread (no process of its own)."""

    depth = 1

    def __init__(self, decode_one: Callable[[bytes], np.ndarray]) -> None:
        self._decode_one = decode_one
        self._sent: collections.deque[list[bytes]] = collections.deque()

    def send(self, images: list[bytes]) -> None:
        self._sent.append(images)

    def receive(self) -> list[Decoded]:
        results = []
        for data in self._sent.popleft():
            result, failure = decode_safely(self._decode_one, data)
            if failure is not None:
                log.error("unexpected failure while decoding an image of %d bytes:\n%s", len(data), failure)
            results.append(result)
        return results

    def close(self) -> None:
        pass


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


@dataclass(eq=False)
class Lane:
    """One caller's jobs, decoded in order; it takes one turn among the callers.

    A stream keeps one for its life, so its cost estimate carries over from
    one request to the next.
    """

    jobs: collections.deque[DecodeJob] = field(default_factory=collections.deque)
    seconds_per_image: float = 0.0


class DecodePool:
    """One thread per decoder, taking chunks of every caller's jobs in turn."""

    def __init__(self, decoders: Sequence[ChunkDecoder], slice_s: float = 0.02) -> None:
        self._slice_s = slice_s
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
        return self.backlog()[0]

    def backlog(self) -> tuple[int, int]:
        """Images queued or being decoded, and the callers (lanes) with images queued."""
        with self._cond:
            return self.busy_images + sum(job.queued for lane in self._turns for job in lane.jobs), len(self._turns)

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
                if not lane.jobs:
                    self._turns.remove(lane)
        return dropped

    @classmethod
    def in_threads(cls, decode_one: Callable[[bytes], np.ndarray], workers: int) -> DecodePool:
        return cls([ThreadDecoder(decode_one) for _ in range(workers)])

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

    def _work(self, decoder: ChunkDecoder) -> None:
        """Keeps up to `decoder.depth` chunks in flight, hands each back as its results come."""
        name_os_thread(threading.current_thread().name)
        in_flight: collections.deque[tuple[DecodeJob, int, int, float]] = collections.deque()
        last_received = 0.0
        try:
            while True:
                while len(in_flight) < decoder.depth and (taken := self._take(wait=not in_flight)) is not None:
                    job, start, count = taken
                    decoder.send([job.images[index] for index in range(start, start + count)])
                    in_flight.append((job, start, count, time.perf_counter()))
                if not in_flight:
                    return  # closed
                job, start, count, sent_at = in_flight.popleft()
                results = self._receive(decoder, count)
                # the decoder started on this chunk when it was sent or when it handed back the one before
                began, last_received = max(sent_at, last_received), time.perf_counter()
                self._hand_back(job, start, count, results, last_received - began)
        finally:
            decoder.close()

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
