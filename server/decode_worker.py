"""Decoding in a child process: Pillow's per-image Python work runs outside the server's GIL.

Pillow releases the GIL only inside its C decoders and resize; opening a
file, parsing its chunks and converting it are Python, so decode threads
queue for the GIL with each other and with the event loop (on 16 CPUs, 16
threads decoded fewer images than 4; BENCHMARKS.md). Each `ProcessDecoder`
owns one child process, started as `python -c` on this module's `main`, so
the child imports Pillow and numpy, never PyTorch or gRPC.

One decode pool thread drives each child over a pair of pipes: it sends a
chunk of encoded images, and the child answers with the chunk's results.
Full-size pixels stay bounded over every process: before decoding an image
larger than `small_pixels`, the child asks its parent thread to hold that
many pixels of the server's `PixelBudget`, and releases them once resized
(`SMALL_PIXELS`).
A child that dies (a decoder crash, the OOM killer) fails nothing but the
image that killed it: the chunk is retried image by image in a new child.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from server.errors import EmbedError, Internal, detached
from server.preprocess import ImageLimits, PixelBudget, decode
from server.runtime import release_memory

log = logging.getLogger(__name__)

Result = np.ndarray | EmbedError

SMALL_PIXELS = 2_000_000
"""Images up to this many pixels are decoded without asking for the budget: a round trip per
image would cost more than they do, and each child holds at most one such image at once."""


@dataclass(frozen=True)
class Setup:
    """What a child needs to decode like the server; the first message it receives."""

    limits: ImageLimits
    image_size: int
    idle_trim_s: float  # idle this long after work, the child gives its freed memory back


class _ChildDied(Exception):
    pass


class ProcessDecoder:
    """One child process that decodes chunks for one decode pool thread."""

    def __init__(self, setup: Setup, budget: PixelBudget) -> None:
        self._setup = setup
        self._budget = budget
        self._lock = threading.Lock()
        self._start()

    def decode(self, images: list[bytes]) -> list[Result]:
        """The chunk's results in order; only an image that crashes the child fails for it."""
        with self._lock:
            try:
                return self._exchange(images)
            except _ChildDied:
                self._restart()
            if len(images) == 1:
                log.error("a decode worker process died on an image of %d bytes; it was restarted", len(images[0]))
                return [Internal("the decoder crashed on this image")]
        return [result for image in images for result in self.decode([image])]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _exchange(self, images: list[bytes]) -> list[Result]:
        held = 0
        try:
            self._send(images)
            while True:
                kind, value = self._receive()
                if kind == "hold":
                    held += self._budget.acquire(value)
                    self._send(True)
                elif kind == "release":
                    granted = min(value, self._budget.capacity)
                    self._budget.release(granted)
                    held -= granted
                else:
                    results, failures = value
                    for failure in failures:
                        log.error("unexpected failure while decoding an image (in a decode worker):\n%s", failure)
                    return results
        finally:
            if held:
                self._budget.release(held)

    def _send(self, message: object) -> None:
        try:
            self._to_child.send(message)
        except OSError as exc:
            raise _ChildDied from exc

    def _receive(self) -> tuple[str, object]:
        try:
            return self._from_child.recv()
        except (EOFError, OSError) as exc:
            raise _ChildDied from exc

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        root = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {root!r}); from server.decode_worker import main; main()"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code, str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._to_child = Connection(to_child_w, readable=False)
        self._from_child = Connection(from_child_r, writable=False)
        self._to_child.send(self._setup)

    def _stop(self) -> None:
        with suppress(OSError):
            self._to_child.send(None)
        self._to_child.close()
        self._from_child.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _restart(self) -> None:
        self._process.kill()
        self._stop()
        self._start()


class _RemoteBudget:
    """The child's side of the parent's `PixelBudget`: large images ask, small ones do not."""

    def __init__(self, to_parent: Connection, from_parent: Connection, small_pixels: int) -> None:
        self._to_parent = to_parent
        self._from_parent = from_parent
        self._small = small_pixels

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if pixels <= self._small:
            yield
            return
        self._to_parent.send(("hold", pixels))
        self._from_parent.recv()
        try:
            yield
        finally:
            self._to_parent.send(("release", pixels))


def _decode_chunk(images: list[bytes], setup: Setup, budget: _RemoteBudget) -> tuple[list[Result], list[str]]:
    results: list[Result] = []
    failures: list[str] = []
    for data in images:
        try:
            results.append(decode(data, setup.limits, setup.image_size, budget))
        except EmbedError as exc:
            results.append(detached(exc))
        except Exception:
            failures.append(traceback.format_exc(limit=8))
            results.append(Internal("internal error while decoding this image"))
    return results, failures


def main() -> None:
    """The child: decodes the chunks its parent sends until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    from_parent = Connection(int(sys.argv[1]), writable=False)
    to_parent = Connection(int(sys.argv[2]), readable=False)
    setup: Setup = from_parent.recv()
    budget = _RemoteBudget(to_parent, from_parent, SMALL_PIXELS)
    dirty = False
    while True:
        if dirty and not from_parent.poll(setup.idle_trim_s):
            release_memory()
            dirty = False
        try:
            images = from_parent.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            return
        if images is None:
            return
        to_parent.send(("done", _decode_chunk(images, setup, budget)))
        dirty = True
