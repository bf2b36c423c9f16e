"""Calls per caller: one caller holding many idle streams locks out neither other callers nor health."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loopback import Relay
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from server.callers import CallLimits, caller_of
from tests import images
from tests.conftest import RunningServer, wait_for


@pytest.mark.parametrize(
    ("peer", "caller"),
    [
        ("ipv4:10.0.0.5:51234", "10.0.0.5"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),
        ("ipv6:[::ffff:127.0.0.1]:5000", "127.0.0.1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/tmp/embed.sock", "unix:/tmp/embed.sock"),
    ],
)
def test_a_caller_is_its_address_without_the_port(peer: str, caller: str) -> None:
    assert caller_of(peer) == caller


def test_calls_are_bounded_per_caller_and_in_all() -> None:
    limits = CallLimits(per_caller=2, total=3)
    assert limits.enter("a") is None and limits.enter("a") is None
    refusal = limits.enter("a")
    assert refusal is not None and "too many calls from a at once (2 is the bound per caller" in refusal
    assert limits.enter("b") is None
    refusal = limits.enter("c")
    assert refusal is not None and "handling 3 calls, its bound" in refusal
    limits.leave("a")
    assert limits.enter("c") is None and limits.calls_of("a") == 1 and limits.open == 3


class LoopThread:
    """An event loop of its own, for a client whose calls stay open while the test goes on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.stop()


def test_idle_streams_of_one_caller_lock_out_neither_others_nor_health(make_server, loop_thread) -> None:
    server: RunningServer = make_server(max_calls_per_caller=20)
    relay = Relay(server.port)  # the other caller calls from 127.0.0.2
    second = grpc.insecure_channel(loop_thread.run(relay.start()))
    refused = ("dinov2_refused_requests_total", {"reason": "calls"})
    flooder: dict[str, Any] = {}

    async def flood(count: int) -> None:
        channel = grpc.aio.insecure_channel(server.address)
        stub = embed_pb2_grpc.EmbedStub(channel)
        flooder["channel"], flooder["calls"] = channel, [stub.EmbedStream() for _ in range(count)]

    loop_thread.run(flood(300))
    wait_for(lambda: server.metrics.value(*refused) == 280)  # the first 20 are open and idle
    assert server.server.calls.calls_of("127.0.0.1") == 20
    other = embed_pb2_grpc.EmbedStub(second).Embed(pb.EmbedRequest(images=[pb.Image(data=images.png())]), timeout=30)
    assert other.embeddings[0].values
    for channel in (second, server.channel):  # the flooder's own address included
        for _ in range(5):
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=images.png())]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many calls from 127.0.0.1 at once (20 is the bound per caller" in info.value.details()

    async def close() -> None:
        await flooder["channel"].close()

    loop_thread.run(close())
    wait_for(lambda: server.server.calls.open == 0)
    assert server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=images.png())]), timeout=30).embeddings[0].values
    second.close()
    loop_thread.run(relay.close())


def test_a_trusted_proxy_names_the_caller_in_grpc_metadata(make_server, loop_thread) -> None:
    server: RunningServer = make_server(max_calls_per_caller=2, trusted_proxies="127.0.0.1")
    request = pb.EmbedRequest(images=[pb.Image(data=images.png())])
    held: dict[str, Any] = {}

    async def hold_two() -> None:
        channel = grpc.aio.insecure_channel(server.address)
        stub = embed_pb2_grpc.EmbedStub(channel)
        forwarded = (("x-forwarded-for", "6.6.6.6, 198.51.100.1"),)  # what a caller wrote, then what the proxy saw
        held["channel"], held["calls"] = channel, [stub.EmbedStream(metadata=forwarded) for _ in range(2)]

    loop_thread.run(hold_two())
    wait_for(lambda: server.server.calls.calls_of("198.51.100.1") == 2)
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Embed(request, metadata=(("x-forwarded-for", "198.51.100.1"),), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many calls from 198.51.100.1 at once" in refused.value.details()
    assert server.stub.Embed(request, metadata=(("x-forwarded-for", "198.51.100.2"),), timeout=30).embeddings
    assert server.server.calls.calls_of("127.0.0.1") == 0 and server.server.calls.calls_of("6.6.6.6") == 0

    async def close() -> None:
        await held["channel"].close()

    loop_thread.run(close())
    wait_for(lambda: server.server.calls.open == 0)
