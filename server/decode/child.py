"""The decode worker process: decodes the chunks its parent sends, and dies with its parent.

Started by `server.decode.worker` as `python -c` on `main`, with the
environment of `setup.child_environment` (no secrets), it imports Pillow and
numpy, never PyTorch or gRPC. A reader thread takes the parent's next chunk
off the pipe while the main thread decodes, so neither side's write waits on
the other's. An image larger than `SMALL_PIXELS` waits for the parent's grant
of that many pixels of its `PixelBudget`, and releases them once resized.

It ends when told to stop, when its parent's pipe closes (every wait wakes
then, the budget's included) or, through `PR_SET_PDEATHSIG`, when the parent
thread that started it dies, even by SIGKILL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from server.decode import wire
from server.decode.decoder import Decoded, decode_safely
from server.decode.setup import SMALL_PIXELS, Setup
from server.preprocess import decode
from server.runtime import name_os_thread, release_memory

_PR_SET_PDEATHSIG = 1


class _ParentGone(BaseException):
    """The parent closed its pipe: whatever the child waits for will never come (not an image's error)."""


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
        if not self._grants.get():
            raise _ParentGone
        try:
            yield
        finally:
            wire.write_frame(self._to_parent, wire.RELEASE, wire.encode_count(pixels))


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent's thread that started this process ends; exits at once if it already has."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


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
        elif kind == wire.STOP:
            grants.put(False)  # wakes a wait for the budget
            chunks.put(None)
            return
        else:
            chunks.put(images)


def _decode_chunk(images: list[bytes], setup: Setup, budget: _RemoteBudget, to_parent: int) -> None:
    decode_one = partial(decode, limits=setup.limits, geometry=setup.geometry, budget=budget,
                         resize=setup.resize, fast=setup.fast)  # fmt: skip
    results: list[Decoded] = []
    failures: list[str] = []
    for data in images:
        result, failure = decode_safely(decode_one, data)
        results.append(result)
        if failure is not None:
            failures.append(failure)
    wire.write_frame(to_parent, wire.DONE, *wire.encode_results(results, failures))


def main() -> None:
    """Decodes chunks until told to stop or the parent is gone. argv: from-parent fd, to-parent fd,
    the parent's pid, the `Setup` as JSON."""
    _die_with_parent(int(sys.argv[3]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    name_os_thread("decode-worker")
    from_parent, to_parent = int(sys.argv[1]), int(sys.argv[2])
    setup = Setup.from_json(json.loads(sys.argv[4]))
    chunks: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
    grants: queue.SimpleQueue[bool] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(from_parent, chunks, grants), daemon=True).start()
    budget = _RemoteBudget(to_parent, grants, SMALL_PIXELS)
    try:
        wire.write_frame(to_parent, wire.READY)
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
            _decode_chunk(images, setup, budget, to_parent)
            del images  # no chunk stays alive while the child waits for the next
            dirty = True
    except (_ParentGone, OSError):  # OSError: the pipe to the parent broke
        return
