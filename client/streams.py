"""EmbedStream lanes: requests written to long-lived streams, answers matched back in order.

A job opens one stream ("lane") per channel. The server answers each stream's
requests in the order they were written, so each lane keeps a FIFO of futures
and its reader task resolves them one response at a time. When a stream
breaks (server stopped, connection refused), every request waiting on it fails
with the stream's status, so the caller can retry those requests elsewhere; the
lane opens a fresh stream for the next request.

The server answers each request within its own `timeout_ms` of receiving it.
So the oldest request waiting on a stream must be answered within that much
(and a margin for the wire) of becoming the oldest; when it is not, the
server is stuck, and the stream is ended DEADLINE_EXCEEDED. A request is never
timed while it waits behind the job's own earlier requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence

import grpc

from client.connection import RetryPolicy
from protos.dinov2.v1 import embed_pb2, embed_pb2_grpc

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_CORE_INTERNAL = "Internal error from Core"


class StreamBroken(Exception):
    """The stream a request was written to ended before answering it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _broken_from(exc: BaseException) -> StreamBroken:
    if isinstance(exc, grpc.aio.AioRpcError):
        return StreamBroken(exc.code().value[0], exc.details() or exc.code().name)
    return StreamBroken(_UNAVAILABLE, f"stream failed: {exc!r}")


class _Stream:
    """One EmbedStream call and the requests written to it that still wait for an answer."""

    def __init__(
        self, stub: embed_pb2_grpc.EmbedStub, metadata: Sequence[tuple[str, str]], answer_within: float | None
    ) -> None:
        self._stub = stub
        self._metadata = tuple(metadata)
        self.call = stub.EmbedStream(metadata=self._metadata)
        self.waiting: deque[asyncio.Future[embed_pb2.EmbedResponse]] = deque()
        self.broken: StreamBroken | None = None
        self._answer_within = answer_within
        self._overdue: asyncio.TimerHandle | None = None
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.ensure_future(self._read())

    async def send(self, request: embed_pb2.EmbedRequest) -> asyncio.Future[embed_pb2.EmbedResponse]:
        """Writes a request; the future resolves to its response or fails with `StreamBroken`."""
        future: asyncio.Future[embed_pb2.EmbedResponse] = asyncio.get_running_loop().create_future()
        async with self._write_lock:  # one write at a time, and the FIFO in write order
            if self.broken is not None:
                future.set_exception(self.broken)
                return future
            self.waiting.append(future)
            if len(self.waiting) == 1:
                self._time_oldest()
            try:
                await self.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                # The call has ended: the reader learns its status and fails every waiter.
                with contextlib.suppress(Exception, asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._reader), 10.0)
                self._fail(_broken_from(exc))
        return future

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                if not self.waiting:
                    raise StreamBroken(_UNAVAILABLE, "server sent a response nobody asked for")
                future = self.waiting.popleft()
                self._time_oldest()
                if not future.done():  # a request whose caller left has no one waiting
                    future.set_result(response)
            self._fail(StreamBroken(_UNAVAILABLE, "stream ended before every request was answered"))
        except asyncio.CancelledError:
            self._fail(StreamBroken(grpc.StatusCode.CANCELLED.value[0], "stream closed"))
            raise
        except StreamBroken as exc:
            self._fail(exc)
        except Exception as exc:
            self._fail(await self._diagnose(exc))

    async def _diagnose(self, exc: BaseException) -> StreamBroken:
        """The stream's real status. grpc.aio may replace the server's status with INTERNAL "Internal
        error from Core" when a write races the server ending the stream (grpc/grpc#36066); a unary
        Info call on the same channel then tells why (a wrong API key, a server going away)."""
        broken = _broken_from(exc)
        if broken.code != _INTERNAL or broken.message != _CORE_INTERNAL:
            return broken
        try:
            await self._stub.Info(embed_pb2.InfoRequest(), timeout=5.0, metadata=self._metadata)
        except grpc.aio.AioRpcError as probe:
            return _broken_from(probe)
        return StreamBroken(_UNAVAILABLE, "stream ended abnormally (status lost, grpc/grpc#36066)")

    def _time_oldest(self) -> None:
        """(Re)starts the clock of the oldest request waiting, if any."""
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        if self.waiting and self._answer_within is not None:
            self._overdue = asyncio.get_running_loop().call_later(self._answer_within, self._stuck)

    def _stuck(self) -> None:
        """The oldest request was not answered in time: the server is stuck; end the stream."""
        self._fail(StreamBroken(_DEADLINE_EXCEEDED, f"no answer within {self._answer_within:g} s"))
        self.call.cancel()

    def _fail(self, error: StreamBroken) -> None:
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        if self.broken is None:
            self.broken = error
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.broken)

    async def close(self) -> None:
        """Half-closes (the server finishes what it has), then waits for the reader briefly."""
        if self.broken is None and not self.waiting:
            with contextlib.suppress(Exception):
                async with self._write_lock:
                    await self.call.done_writing()
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


class Lane:
    """A channel's slot in a job: at most one live stream, reopened after it breaks."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]], answer_within: float | None = None
    ) -> None:
        self._stub = embed_pb2_grpc.EmbedStub(channel)
        self._metadata = metadata
        self._answer_within = answer_within
        self._stream: _Stream | None = None
        self.down_until = 0.0
        self.failures = 0

    async def send(self, request: embed_pb2.EmbedRequest) -> asyncio.Future[embed_pb2.EmbedResponse]:
        if self._stream is None or self._stream.broken is not None:
            if self._stream is not None:
                await self._stream.close()
            self._stream = _Stream(self._stub, self._metadata, self._answer_within)
        return await self._stream.send(request)

    def failed(self, retry: RetryPolicy) -> None:
        """Steers requests elsewhere for a while, longer after each failure in a row."""
        self.failures += 1
        pause = min(retry.max_backoff_s, retry.initial_backoff_s * retry.multiplier ** (self.failures - 1))
        self.down_until = time.monotonic() + pause

    def succeeded(self) -> None:
        self.failures = 0
        self.down_until = 0.0

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None


class Lanes:
    """Round-robin over a job's lanes, skipping lanes marked down while others are up.

    `answer_within`: seconds the oldest request of a stream may wait for its answer (None: forever).
    """

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        metadata: Sequence[tuple[str, str]],
        answer_within: float | None = None,
    ) -> None:
        self._lanes = [Lane(channel, metadata, answer_within) for channel in channels]
        self._next = 0

    def pick(self, avoid: Lane | None = None) -> Lane:
        """The next lane that is up, other than `avoid` if possible; else the one up soonest."""
        now = time.monotonic()
        count = len(self._lanes)
        for step in range(count):
            lane = self._lanes[(self._next + step) % count]
            if lane.down_until <= now and (lane is not avoid or count == 1):
                self._next = (self._next + step + 1) % count
                return lane
        lane = min(self._lanes, key=lambda candidate: candidate.down_until)
        self._next = (self._lanes.index(lane) + 1) % count
        return lane

    async def close(self) -> None:
        await asyncio.gather(*(lane.close() for lane in self._lanes), return_exceptions=True)
