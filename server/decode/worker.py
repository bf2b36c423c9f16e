"""The parent's handle on one decode worker process: chunks out, results back, nothing lost or mixed up.

Pillow releases the GIL only inside its C decoders and resize; opening a
file, parsing its chunks and converting it are Python, so decode threads
queue for the GIL with each other and with the event loop (on 16 CPUs, 16
threads decoded fewer images than 4; BENCHMARKS.md). So each decode pool
thread drives a child process of its own (`server.decode.child`) over a pair
of pipes, two chunks in flight, in `server.decode.wire`'s binary frames.

A child that dies (a decoder crash, the OOM killer) or overruns
`Setup.timeout_s` on a chunk is killed, and that chunk is retried image by
image in new children: only the image that kills one, or takes too long on
its own, fails. Every chunk is answered with its own results or its own
errors, in order, whatever happens to the processes; a child that cannot be
started fails the chunks waiting for it (`Internal`), and the next start
waits a backoff that doubles with each crash in a row.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from server.decode import wire
from server.decode.budget import PixelBudget
from server.decode.decoder import Decoded
from server.decode.setup import Setup, child_environment
from server.errors import Internal, InvalidImage

log = logging.getLogger(__name__)

_F_SETPIPE_SZ = 1031
_PIPE_BYTES = 1 << 20
_START_TIMEOUT_S = 120.0  # a child's imports, on a loaded machine
_BACKOFF_S = (0.05, 2.0)  # the wait before a start after one crash, and the most it grows to


class _ChildDied(Exception):
    """The child closed its pipe or sent what the wire format does not allow."""


class _NoChild(Exception):
    """No child process could be started."""


class _Child:
    """One child process and the parent's ends of its pipes; `close` once, after which no fd is used."""

    def __init__(self, setup: Setup) -> None:
        to_child_r, to_child_w = os.pipe()
        try:
            from_child_r, from_child_w = os.pipe()
        except OSError:
            os.close(to_child_r)
            os.close(to_child_w)
            raise
        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from server.decode.child import main; main()"
        argv = [str(to_child_r), str(from_child_w), str(os.getpid()), json.dumps(setup.to_json())]
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=child_environment(),
            )
        except BaseException:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        for fd in (to_child_w, from_child_r):
            with suppress(OSError):  # larger pipes: fewer switches per chunk (Linux; capped by pipe-max-size)
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        os.set_blocking(to_child_w, False)  # writes wait with a deadline (wire.write_frame)
        self.to_child, self.from_child = to_child_w, from_child_r
        self.ready = False
        self.held = 0  # pixels of the budget the child holds now

    def close(self, budget: PixelBudget, kill: bool) -> None:
        """Ends the process (asked to stop, or killed) and returns the budget it held."""
        if kill:
            self.process.kill()
        else:
            with suppress(OSError, wire.Overdue):
                wire.write_frame(self.to_child, wire.STOP, deadline=time.monotonic() + 1)
        for fd in (self.to_child, self.from_child):
            os.close(fd)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        budget.release(self.held)
        self.held = 0


@dataclass(eq=False)
class _Chunk:
    images: list[bytes]
    child: _Child | None = None  # the child it was written to


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
        self._sent: collections.deque[_Chunk] = collections.deque()  # chunks not received yet, in order
        self._child: _Child | None = None
        self._crashes = 0  # in a row: sets the backoff before the next start
        self._not_before = 0.0
        with suppress(_NoChild):
            self._running()

    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child else None

    def send(self, images: list[bytes]) -> None:
        chunk = _Chunk(images)
        in_order = all(earlier.child is self._child for earlier in self._sent)
        self._sent.append(chunk)
        if self._child is not None and in_order:
            try:
                self._write(self._child, wire.CHUNK, *wire.encode_chunk(images))
                chunk.child = self._child
            except (_ChildDied, wire.Overdue):
                self._drop_child()

    def receive(self) -> list[Decoded]:
        """The oldest sent chunk's results, in order; only an image that kills the child, or
        overruns the timeout on its own, fails for it."""
        chunk = self._sent.popleft()
        try:
            child = self._running()
            if chunk.child is not child:  # its child died before answering, or none was running
                self._write(child, wire.CHUNK, *wire.encode_chunk(chunk.images))
            results = self._results(child, len(chunk.images))
        except _NoChild:
            return [_no_process() for _ in chunk.images]
        except (_ChildDied, wire.Overdue):
            self._drop_child()
            return self._one_by_one(chunk.images)
        self._crashes = 0
        return results

    def decode(self, images: list[bytes]) -> list[Decoded]:
        self.send(images)
        return self.receive()

    def close(self) -> None:
        if self._child is not None:
            self._child.close(self._budget, kill=False)
            self._child = None

    def _one_by_one(self, images: list[bytes]) -> list[Decoded]:
        """After a chunk killed its child or overran: each image alone, in a child of its own if need be."""
        results: list[Decoded] = []
        for image in images:
            try:
                child = self._running()
                self._write(child, wire.CHUNK, *wire.encode_chunk([image]))
                results += self._results(child, 1)
                self._crashes = 0
            except _NoChild:
                return results + [_no_process() for _ in images[len(results) :]]
            except _ChildDied:
                self._drop_child()
                log.error("a decode worker process died on an image of %d bytes; it is replaced", len(image))
                results.append(Internal("the decoder crashed on this image"))
            except wire.Overdue:
                self._drop_child()
                log.warning("an image of %d bytes took over %g s to decode; its worker was stopped",
                            len(image), self._setup.timeout_s)  # fmt: skip
                results.append(InvalidImage(f"decoding this image took longer than {self._setup.timeout_s:g} s; "
                                            "it was stopped"))  # fmt: skip
        return results

    def _results(self, child: _Child, count: int) -> list[Decoded]:
        """The results of the oldest chunk in the child, of `count` images, in order.

        The chunk must be answered within `timeout_s`, not counting the time
        its child waits for the pixel budget (other workers' images).
        """
        if not child.ready:
            self._read(child, 0, time.monotonic() + _START_TIMEOUT_S, wire.READY)
            child.ready = True
        deadline = time.monotonic() + self._setup.timeout_s
        while True:
            kind, body = self._read(child, wire.max_results_body(count, self._setup.result_pixels), deadline)
            try:
                if kind == wire.HOLD:
                    waited = time.monotonic()
                    child.held += self._budget.acquire(wire.decode_count(body))
                    deadline += time.monotonic() - waited
                    self._write(child, wire.GRANT)
                elif kind == wire.RELEASE:
                    granted = min(wire.decode_count(body), child.held)
                    self._budget.release(granted)
                    child.held -= granted
                elif kind == wire.DONE:
                    results, failures = wire.decode_results(body, count, self._setup.result_size)
                    for failure in failures:
                        log.error("unexpected failure while decoding an image (in a decode worker):\n%s", failure)
                    return results
                else:
                    raise wire.WireError(f"unexpected {kind!r} frame")
            except wire.WireError as exc:
                log.error("a decode worker sent a malformed answer (%s); it is replaced", exc)
                raise _ChildDied from None

    def _read(self, child: _Child, max_body: int, deadline: float, *kinds: bytes) -> tuple[bytes, bytearray]:
        try:
            return wire.read_frame(child.from_child, max_body, kinds or wire.FROM_CHILD, deadline)
        except (wire.WireError, OSError) as exc:
            raise _ChildDied from exc

    def _write(self, child: _Child, kind: bytes, *body: wire.Buffer) -> None:
        try:
            wire.write_frame(child.to_child, kind, *body, deadline=time.monotonic() + self._setup.timeout_s)
        except OSError as exc:
            raise _ChildDied from exc

    def _running(self) -> _Child:
        """The child, started if none runs (after the backoff of a crash loop); `_NoChild` if it cannot be."""
        if self._child is not None:
            return self._child
        time.sleep(max(0.0, self._not_before - time.monotonic()))
        try:
            self._child = _Child(self._setup)
        except OSError as exc:
            self._crashed()
            log.error("a decode worker process could not be started (%s); retrying in %.2f s", exc,
                      self._not_before - time.monotonic())  # fmt: skip
            raise _NoChild from exc
        return self._child

    def _drop_child(self) -> None:
        """Kills the child (it died, hung or misbehaved): the next chunk starts a new one, after a backoff."""
        if self._child is not None:
            self._child.close(self._budget, kill=True)
            self._child = None
        self._crashed()

    def _crashed(self) -> None:
        self._crashes += 1
        self._not_before = time.monotonic() + backoff_s(self._crashes)


def backoff_s(crashes: int) -> float:
    """The wait before a start after `crashes` crashes (or failed starts) in a row."""
    first, most = _BACKOFF_S
    return min(most, first * 2 ** (crashes - 1))


def _no_process() -> Internal:
    return Internal("no decode worker process could be started; retry")
