"""Decoding on worker threads: fair between calls, handed back to the event loop in chunks.

Each call's images form a job. Workers take turns between jobs (round robin),
so a call with many expensive images cannot hold every worker while a small
call waits. A worker takes a chunk of a job's images sized to about `slice_s`
of work (from the job's own decode times so far), decodes it, and hands the
whole chunk back with one event-loop wake-up. Pillow releases the GIL while it
decodes and resizes, so the threads run in parallel. A job whose caller left
is dropped, with whatever of it was still queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.errors import EmbedError, Internal, detached

log = logging.getLogger(__name__)

Decoded = np.ndarray | EmbedError
"""One image's decode result: uint8 pixels, or the (detached) error that refused it."""

Deliver = Callable[[int, list[Decoded]], None]
"""Called on the job's event loop with a chunk: the index of its first image and the results."""

MAX_CHUNK = 32


@dataclass(eq=False)
class DecodeJob:
    """One call's images, as the workers see it."""

    images: Sequence[bytes]
    deliver: Deliver
    loop: asyncio.AbstractEventLoop
    next_index: int = 0
    cancelled: bool = False
    seconds_per_image: float = field(default=0.0)

    @property
    def queued(self) -> int:
        """Images not yet taken by a worker."""
        return len(self.images) - self.next_index


class DecodePool:
    """`workers` threads running `decode_one` over the jobs of every caller, in turn."""

    def __init__(self, decode_one: Callable[[bytes], np.ndarray], workers: int, slice_s: float = 0.02) -> None:
        self._decode_one = decode_one
        self._slice_s = slice_s
        self._jobs: collections.deque[DecodeJob] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.busy_images = 0  # images taken by a worker and not yet handed back
        self._threads = [
            threading.Thread(target=self._work, name=f"decode-{n}", daemon=True) for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Images queued or being decoded, over all jobs: more images are on their way to the batcher."""
        with self._cond:
            return self.busy_images + sum(job.queued for job in self._jobs)

    def submit(self, images: Sequence[bytes], deliver: Deliver) -> DecodeJob:
        """Queues a call's images; `deliver` gets them back in chunks, on the calling loop."""
        job = DecodeJob(images, deliver, asyncio.get_running_loop())
        if images:
            with self._cond:
                if self._closed:
                    raise RuntimeError("decode pool is closed")
                self._jobs.append(job)
                self._cond.notify()
        return job

    def cancel(self, job: DecodeJob) -> int:
        """Drops a job's queued images (those being decoded are discarded when done); returns how many."""
        with self._cond:
            job.cancelled = True
            dropped = job.queued
            job.next_index = len(job.images)
            if job in self._jobs:
                self._jobs.remove(job)
        return dropped

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()

    def _take(self) -> tuple[DecodeJob, int, int] | None:
        """The next job in turn and a chunk of it: (job, first index, count); None once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._jobs or self._closed)
            if self._closed:
                return None
            job = self._jobs.popleft()
            if job.seconds_per_image > 0:
                count = max(1, min(int(self._slice_s / job.seconds_per_image), MAX_CHUNK, job.queued))
            else:
                count = 1  # a job's first chunk measures what one of its images costs
            start = job.next_index
            job.next_index += count
            if job.queued:
                self._jobs.append(job)  # back of the line: the other calls go first
            self.busy_images += count
            return job, start, count

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            job, start, count = taken
            results: list[Decoded] = []
            began = time.perf_counter()
            for index in range(start, start + count):
                if job.cancelled:
                    break
                results.append(self._decode_safely(job.images[index]))
            elapsed = time.perf_counter() - began
            with self._cond:
                self.busy_images -= count
                if results:
                    job.seconds_per_image = elapsed / len(results)
            if not job.cancelled:
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                    job.loop.call_soon_threadsafe(job.deliver, start, results)
            del results

    def _decode_safely(self, data: bytes) -> Decoded:
        """One image's result; a failure of any kind stays this image's, never the call's."""
        try:
            return self._decode_one(data)
        except EmbedError as exc:
            return detached(exc)
        except Exception:
            log.exception("unexpected failure while decoding an image of %d bytes", len(data))
            return Internal("internal error while decoding this image")
