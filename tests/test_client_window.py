"""The client's window: it shrinks when the server is busy and grows back when it keeps up."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from client import EmbedClient, RetryPolicy
from client.window import AdaptiveWindow, AsyncGate
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_the_window_halves_once_per_round_trip_and_grows_by_one_per_window_of_answers() -> None:
    sizes: list[int] = []
    window = AdaptiveWindow(8, lambda size, most: sizes.append(size))
    sent = time.monotonic()
    window.busy(sent)
    window.busy(sent)  # a refusal of a request sent before the cut: the same congestion, no second cut
    assert window.size == 4
    window.busy(time.monotonic())
    window.busy(time.monotonic())
    window.busy(time.monotonic())
    assert window.size == 1  # never below one
    for _ in range(1 + 2 + 3 + 4 + 5 + 6 + 7):
        window.answered()
    assert window.size == 8 and sizes == [4, 2, 1, 2, 3, 4, 5, 6, 7, 8]
    for _ in range(20):
        window.answered()
    assert window.size == 8  # never past its most


async def test_the_gate_holds_tries_to_the_window_and_lets_earlier_requests_go_first() -> None:
    gate = AsyncGate(AdaptiveWindow(2))
    order: list[int] = []
    release = asyncio.Event()

    async def one(priority: int) -> None:
        async with gate.slot(priority):
            order.append(priority)
            await release.wait()

    tasks = [asyncio.ensure_future(one(p)) for p in (5, 6, 9, 7, 8)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == [5, 6] and gate.in_use == 2
    gate.busy(0.0)  # the window is one now: a freed slot is not handed on until one is free under it
    release.set()
    await asyncio.gather(*tasks)
    assert order == [5, 6, 7, 8, 9] and gate.in_use == 0


class BusyEmbed(embed_pb2_grpc.EmbedServicer):
    """A stand-in server that handles `capacity` requests at once and refuses the rest RESOURCE_EXHAUSTED.

    Each image's embedding is its id as a number. Once `after` requests were answered it handles
    `raise_to` at once, like a server whose other callers went away. Once `whole_after` were answered
    (enough for a window cut to one to have grown back to `raise_to`), it holds the requests it gets
    until `raise_to` of them are in flight at once (`whole_window` then holds True), or for at most
    `hold_s`: a window that did not grow back does not hang the test, it fails it.
    """

    def __init__(self, capacity: int, raise_to: int, after: int, whole_after: int, hold_s: float = 30.0) -> None:
        self.capacity, self.raise_to, self.after, self.whole_after = capacity, raise_to, after, whole_after
        self.hold_s = hold_s
        self.in_flight = 0
        self.answered = 0
        self.refused = 0
        self.whole_window: bool | None = None  # None: not asked for yet
        self._held: asyncio.Event | None = None

    async def _one(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        if self.in_flight >= self.capacity:
            self.refused += 1
            return pb.EmbedResponse(error=pb.Error(code=RESOURCE_EXHAUSTED, message="server is busy; retry"))
        self.in_flight += 1
        try:
            if self.answered >= self.whole_after and self.whole_window is None:
                await self._until_whole_window()
            await asyncio.sleep(0.005)
        finally:
            self.in_flight -= 1
        self.answered += 1
        if self.answered >= self.after:
            self.capacity = self.raise_to
        return pb.EmbedResponse(embeddings=[pb.Embedding(id=i.id, values=[float(i.id)]) for i in request.images])

    async def _until_whole_window(self) -> None:
        """Holds this request until `raise_to` requests are in flight at once, or `hold_s` passed."""
        if self._held is None:
            self._held = asyncio.Event()
        if self.in_flight >= self.raise_to:
            self.whole_window = True
            self._held.set()
            return
        try:
            await asyncio.wait_for(self._held.wait(), self.hold_s)
        except TimeoutError:
            if self.whole_window is None:
                self.whole_window = False
            self._held.set()

    async def EmbedStream(
        self, requests: AsyncIterator[pb.EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedResponse]:
        pending: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None] = asyncio.Queue()

        async def read() -> None:
            async for request in requests:
                await pending.put(asyncio.ensure_future(self._one(request)))
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        while (task := await pending.get()) is not None:
            yield await task
        await reader


@pytest.fixture
def busy_server() -> Iterator[tuple[str, BusyEmbed]]:
    servicer = BusyEmbed(capacity=2, raise_to=8, after=40, whole_after=80)  # the test's window is 8
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        embed_pb2_grpc.add_EmbedServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield f"127.0.0.1:{port}", servicer
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_a_busy_server_shrinks_the_window_and_one_that_keeps_up_gets_it_back(
    busy_server: tuple[str, BusyEmbed],
) -> None:
    address, servicer = busy_server
    sizes: list[int] = []
    retry = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, on_window=lambda size, most: sizes.append(size))
    ids = [str(i) for i in range(400)]
    with EmbedClient(address, retry=retry, batch_size=4, window=8) as client:
        embeddings = client.embed([b"x"] * len(ids), ids=ids)
    assert np.array_equal(embeddings[:, 0], np.arange(400, dtype=np.float32))  # every image, in order
    assert servicer.refused > 0 and min(sizes) <= 2  # refused while it could take two: shrank
    assert sizes[-1] == 8 and max(sizes) == 8  # then grew back to the whole window, and never past it
    # 100 requests: 40 answered while the server took two at once, 40 more to grow back from one
    # (1 + 2 + ... + 7 answers and room for those in flight at the cut), 20 left to hold at once
    assert servicer.whole_window, "the server never had the whole window of requests in flight at once"
