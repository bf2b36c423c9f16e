"""Decoding in a child process: Pillow's per-image Python work runs outside the server's GIL.

Pillow releases the GIL only inside its C decoders and resize; opening a
file, parsing its chunks and converting it are Python, so decode threads
queue for the GIL with each other and with the event loop (on 16 CPUs, 16
threads decoded fewer images than 4; BENCHMARKS.md). Each `ProcessDecoder`
owns one child process, started as `python -c` on this module's `main`, so
the child imports Pillow and numpy, never PyTorch or gRPC.

One decode pool thread drives each child over a pair of pipes: it sends
chunks of encoded images, two in flight, and the child answers each with
its results, both in `server.decode_wire`'s binary frames (never pickle); a
reader thread in the child takes the next chunk off the pipe while the
child decodes, so neither side's write waits on the other's.
Full-size pixels stay bounded over every process: before decoding an image
larger than `small_pixels`, the child asks its parent thread to hold that
many pixels of the server's `PixelBudget`, and releases them once resized
(`SMALL_PIXELS`).
A child that dies (a decoder crash, the OOM killer) fails nothing but the
image that killed it: the chunk is retried image by image in a new child.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from server import decode_wire as wire
from server.decoding import decode_safely
from server.errors import EmbedError, Internal
from server.preprocess import ImageLimits, PixelBudget, decode
from server.runtime import name_os_thread, release_memory

log = logging.getLogger(__name__)

Result = np.ndarray | EmbedError

SMALL_PIXELS = 2_000_000
"""Images up to this many pixels are decoded without asking for the budget: a round trip per
image would cost more than they do, and each child holds at most one such image at once."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a child needs to decode like the server; it travels as JSON on the child's command line."""

    limits: ImageLimits
    image_size: int
    idle_trim_s: float  # idle this long after work, the child gives its freed memory back

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Setup:
        return cls(**{**fields, "limits": ImageLimits(**fields["limits"])})


_F_SETPIPE_SZ = 1031
_PIPE_BYTES = 1 << 20


class _ChildDied(Exception):
    pass


class ProcessDecoder:
    """One child process that decodes chunks for one decode pool thread, two chunks in flight.

    The pool thread `send`s a chunk, and may send the next before it
    `receive`s the first one's results, so the child starts on the next
    chunk while this process hands the last one on.
    """

    depth = 2

    def __init__(self, setup: Setup, budget: PixelBudget) -> None:
        self._setup = setup
        self._budget = budget
        self._sent: collections.deque[list[bytes]] = collections.deque()  # chunks the child owes results for
        self._held = 0  # pixels of the budget the child holds now
        self._dead = False
        self._start()

    def send(self, images: list[bytes]) -> None:
        self._sent.append(images)
        if not self._dead:
            try:
                self._send(images)
            except _ChildDied:
                self._dead = True

    def receive(self) -> list[Result]:
        """The oldest sent chunk's results, in order; only an image that crashes the child fails for it."""
        if not self._dead:
            try:
                results = self._results(len(self._sent[0]))
            except _ChildDied:
                self._dead = True
            else:
                self._sent.popleft()
                return results
        self._restart()
        results = [self._retry_alone(image) for image in self._sent.popleft()]
        for chunk in self._sent:  # lost with the old child: sent again, in order
            try:
                self._send(chunk)
            except _ChildDied:
                self._dead = True
                break
        return results

    def decode(self, images: list[bytes]) -> list[Result]:
        self.send(images)
        return self.receive()

    def close(self) -> None:
        self._stop()

    def _retry_alone(self, image: bytes) -> Result:
        """After a crash, each image of the chunk on its own: the one that kills a child fails."""
        try:
            self._send([image])
            return self._results(1)[0]
        except _ChildDied:
            self._restart()
        log.error("a decode worker process died on an image of %d bytes; it was restarted", len(image))
        return Internal("the decoder crashed on this image")

    def _results(self, count: int) -> list[Result]:
        """The results of the oldest chunk in the child, of `count` images, in order."""
        while True:
            kind, body = self._receive(wire.max_results_body(count, self._setup.image_size))
            try:
                if kind == wire.HOLD:
                    self._held += self._budget.acquire(wire.decode_count(body))
                    self._write(wire.GRANT)
                elif kind == wire.RELEASE:
                    granted = min(wire.decode_count(body), self._held)
                    self._budget.release(granted)
                    self._held -= granted
                else:
                    results, failures = wire.decode_results(body, count, self._setup.image_size)
                    for failure in failures:
                        log.error("unexpected failure while decoding an image (in a decode worker):\n%s", failure)
                    return results
            except wire.WireError as exc:
                log.error("a decode worker sent a malformed answer (%s); it is restarted", exc)
                raise _ChildDied from None

    def _send(self, images: list[bytes]) -> None:
        self._write(wire.CHUNK, *wire.encode_chunk(images))

    def _write(self, kind: bytes, *body: bytes) -> None:
        try:
            wire.write_frame(self._to_child, kind, *body)
        except OSError as exc:
            raise _ChildDied from exc

    def _receive(self, max_body: int) -> tuple[bytes, bytearray]:
        try:
            return wire.read_frame(self._from_child, max_body)
        except (wire.WireError, OSError) as exc:
            raise _ChildDied from exc

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        root = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {root!r}); from server.decode_worker import main; main()"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code, str(to_child_r), str(from_child_w), json.dumps(self._setup.to_json())],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        for fd in (to_child_w, from_child_r):
            with suppress(OSError):  # larger pipes: fewer switches per chunk (Linux; capped by pipe-max-size)
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        self._to_child = to_child_w
        self._from_child = from_child_r

    def _stop(self) -> None:
        with suppress(_ChildDied):
            self._write(wire.STOP)
        for fd in (self._to_child, self._from_child):
            with suppress(OSError):
                os.close(fd)
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _restart(self) -> None:
        self._process.kill()
        self._stop()
        if self._held:
            self._budget.release(self._held)
            self._held = 0
        self._dead = False
        self._start()


class _RemoteBudget:
    """The child's side of the parent's `PixelBudget`: large images ask, small ones do not."""

    def __init__(self, to_parent: int, grants: queue.SimpleQueue[bool], small_pixels: int) -> None:
        self._to_parent = to_parent
        self._grants = grants
        self._small = small_pixels

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if pixels <= self._small:
            yield
            return
        wire.write_frame(self._to_parent, wire.HOLD, wire.encode_count(pixels))
        self._grants.get()
        try:
            yield
        finally:
            wire.write_frame(self._to_parent, wire.RELEASE, wire.encode_count(pixels))


def _decode_chunk(images: list[bytes], setup: Setup, budget: _RemoteBudget) -> tuple[list[Result], list[str]]:
    decode_one = partial(decode, limits=setup.limits, image_size=setup.image_size, budget=budget)
    results: list[Result] = []
    failures: list[str] = []
    for data in images:
        result, failure = decode_safely(decode_one, data)
        results.append(result)
        if failure is not None:
            failures.append(failure)
    return results, failures


def _read(from_parent: int, chunks: queue.SimpleQueue[list[bytes] | None], grants: queue.SimpleQueue[bool]) -> None:
    """Reads the parent's frames as they come, so its next chunk never waits on our results."""
    while True:
        try:
            kind, body = wire.read_frame(from_parent, sys.maxsize, wire.FROM_PARENT)  # the parent is trusted
            images = wire.decode_chunk(body) if kind == wire.CHUNK else None
        except (wire.WireError, OSError):  # the parent is gone, or a bug: end, and the parent restarts us
            kind, images = wire.STOP, None
        if kind == wire.GRANT:
            grants.put(True)
            continue
        chunks.put(images)
        if kind == wire.STOP:
            return


def main() -> None:
    """The child: decodes the chunks its parent sends until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    name_os_thread("decode-worker")
    from_parent, to_parent = int(sys.argv[1]), int(sys.argv[2])
    setup = Setup.from_json(json.loads(sys.argv[3]))
    chunks: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
    grants: queue.SimpleQueue[bool] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(from_parent, chunks, grants), daemon=True).start()
    budget = _RemoteBudget(to_parent, grants, SMALL_PIXELS)
    dirty = False
    while True:
        try:
            images = chunks.get(timeout=setup.idle_trim_s) if dirty else chunks.get()
        except queue.Empty:
            release_memory()
            dirty = False
            continue
        if images is None:
            return
        results, failures = _decode_chunk(images, setup, budget)
        wire.write_frame(to_parent, wire.DONE, *wire.encode_results(results, failures))
        dirty = True
