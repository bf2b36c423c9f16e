"""What a caller can make the server spend: memory and decode time, bounded by bytes and pixels.

Each test runs `python -m server` as a subprocess with its defaults (so its
peak RSS is its own), loads it from this process's threads, and reads the
server's peak and current RSS from /proc.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench.loopback import Relay
from bench.server_proc import ServerProcess, status_kb
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from tests import images, raw_http
from tests.conftest import Reference, assert_close

GB = 1 << 30
MB = 1 << 20
JSON = {"Content-Type": "application/json"}
BIG = [("grpc.max_send_message_length", 256 * MB), ("grpc.max_receive_message_length", 256 * MB)]


@pytest.fixture
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
                       ready_timeout_s=180) as running:  # fmt: skip
        yield running


@pytest.fixture
def http_server(model_dir: Path) -> Iterator[ServerProcess]:
    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0"]
    with ServerProcess(args, ready_timeout_s=180) as running:
        yield running


def wait_for_rss_below(server: ServerProcess, limit: int, within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while (now := server.rss_bytes()) > limit and time.monotonic() < deadline:
        time.sleep(0.5)
    return now


def raw_embed(address: str) -> Callable[..., pb.EmbedResponse]:
    """An Embed call that sends pre-serialized bytes (the client then holds one copy, not one per call)."""
    ch = grpc.insecure_channel(address, options=BIG)
    return ch.unary_unary("/dinov2.v1.Embed/Embed", request_serializer=None,
                          response_deserializer=pb.EmbedResponse.FromString)  # fmt: skip


def in_threads(count: int, work: Callable[[], str]) -> Counter[str]:
    """Runs `work()` on `count` threads at once; what each returned, counted once every thread came back.

    A `work()` that raised counts as "raised <type>: <message>" (a plain thread would only print it and go
    uncounted), so a caller's check of the outcomes fails on it; a thread that never came back fails here.
    """
    outcomes: list[str] = []

    def one() -> None:
        try:
            outcomes.append(work())
        except Exception as exc:
            outcomes.append(f"raised {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    counted = Counter(outcomes)
    assert len(outcomes) == count, f"{count - len(outcomes)} of {count} calls never came back: {counted}"
    return counted


def truncated_png(width: int, height: int) -> bytes:
    data = images.encode(Image.new("RGBA", (width, height)), "PNG", compress_level=1)
    return data[: len(data) // 2]


def test_truncated_50mp_pngs_in_one_request_are_each_refused_and_memory_stays_bounded(
    server: ServerProcess,
) -> None:
    data = truncated_png(7071, 7070)
    request = pb.EmbedRequest(images=[pb.Image(data=data, id=f"t{i}") for i in range(64)])
    response = embed_pb2_grpc.EmbedStub(grpc.insecure_channel(server.address, options=BIG)).Embed(request, timeout=300)
    assert [e.id for e in response.embeddings] == [f"t{i}" for i in range(64)]
    for item in response.embeddings:
        assert item.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "truncated PNG" in item.error.message, item.error.message
    peak = server.peak_rss_bytes()
    assert peak < 2.5 * GB, f"peak RSS {peak / GB:.2f} GB"


def test_concurrent_large_requests_are_answered_or_refused_within_bounded_memory(
    server: ServerProcess, reference: Reference
) -> None:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (1680, 1680, 3), dtype=np.uint8))
    png = images.encode(noise, "PNG", compress_level=1)  # ~8.5 MB: noise does not compress
    raw = pb.EmbedRequest(images=[pb.Image(data=png, id=str(i)) for i in range(15)]).SerializeToString()
    expected = reference.embed(png)
    call = raw_embed(server.address)

    def one() -> str:
        try:
            response = call(raw, timeout=300)
        except grpc.RpcError as exc:
            return exc.code().name
        ids = [item.id for item in response.embeddings]
        assert ids == [str(i) for i in range(15)], f"answered {ids}"
        for item in response.embeddings:
            assert_close(np.array(item.values, np.float32), expected, f"large png {item.id}")
        return "OK"

    outcomes = in_threads(32, one)  # all 32 came back; a failed parity check is an outcome of its own
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"} and outcomes["OK"] >= 1, outcomes
    peak = server.peak_rss_bytes()
    assert peak < 4 * GB, f"peak RSS {peak / GB:.2f} GB ({outcomes})"
    after = wait_for_rss_below(server, int(1.5 * GB), within_s=30)
    assert after < 1.5 * GB, f"RSS still {after / GB:.2f} GB 30 s after the load"


def test_memory_goes_back_after_a_burst_while_small_requests_keep_flowing(server: ServerProcess) -> None:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (1680, 1680, 3), dtype=np.uint8))
    png = images.encode(noise, "PNG", compress_level=1)  # ~8.5 MB: noise does not compress
    raw = pb.EmbedRequest(images=[pb.Image(data=png, id=str(i)) for i in range(15)]).SerializeToString()
    call = raw_embed(server.address)
    small = embed_pb2_grpc.EmbedStub(grpc.insecure_channel(server.address))
    request = pb.EmbedRequest(images=[pb.Image(data=images.jpeg())] * 4)  # no whole second with nothing in flight
    answers: list[str] = []
    refusals: list[str] = []
    stop = threading.Event()

    def one() -> str:
        try:
            call(raw, timeout=300)
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"

    def one_a_second() -> None:  # the scenario's pace: a call starts on each second (at once if one was late)
        due = time.monotonic()
        while not stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + 1.0, time.monotonic())
            try:  # a deadline the burst's PNGs ahead of it leave time for: admission refuses one they do not
                answers.append("OK" if small.Embed(request, timeout=120).embeddings[0].values else "empty")
            except grpc.RpcError as exc:
                answers.append(exc.code().name)
                refusals.append(f"{exc.code().name}: {exc.details()}")

    flowing = threading.Thread(target=one_a_second)
    flowing.start()
    try:
        outcomes = in_threads(32, one)
        peak, during, burst_end = server.peak_rss_bytes(), len(answers), time.monotonic()
        after = wait_for_rss_below(server, int(1.5 * GB), within_s=30)
        waited_s, since = time.monotonic() - burst_end, len(answers) - during
    finally:
        stop.set()
        flowing.join()
    print(f"peak {peak / GB:.2f} GB, {after / GB:.2f} GB {waited_s:.1f} s after the burst; small calls: {during} "
          f"during the burst, {since} after")  # fmt: skip
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"} and outcomes["OK"] >= 1, outcomes
    assert answers and set(answers) == {"OK"}, (Counter(answers), refusals)
    assert after < 1.5 * GB, f"RSS still {after / GB:.2f} GB 30 s after the burst (peak {peak / GB:.2f} GB)"


def test_compressed_requests_are_refused_before_they_are_inflated(server: ServerProcess) -> None:
    inflated = pb.EmbedRequest(images=[pb.Image(data=bytes(8 * MB), id=str(i)) for i in range(15)])
    stub = embed_pb2_grpc.EmbedStub(grpc.insecure_channel(server.address, options=BIG))

    def one() -> str:
        try:
            stub.Embed(inflated, timeout=120, compression=grpc.Compression.Gzip)
        except grpc.RpcError as exc:
            assert "gzip" in (exc.details() or "") or exc.code() != grpc.StatusCode.UNIMPLEMENTED
            return exc.code().name
        return "OK"

    outcomes = sum((in_threads(10, one) for _ in range(6)), Counter())
    assert outcomes == {"UNIMPLEMENTED": 60}, outcomes
    peak = server.peak_rss_bytes()
    assert peak < 3 * GB, f"peak RSS {peak / GB:.2f} GB"
    after = wait_for_rss_below(server, int(1.5 * GB), within_s=30)
    assert after < 1.5 * GB
    uncompressed = stub.Embed(pb.EmbedRequest(images=[pb.Image(data=images.png())]), timeout=60)
    assert uncompressed.embeddings[0].values


def test_a_client_of_huge_images_does_not_starve_a_small_request(server: ServerProcess) -> None:
    flat = images.encode(Image.new("L", (8000, 6250), 128), "WEBP", lossless=True)  # 50 MP, tiny on the wire
    heavy = pb.EmbedRequest(images=[pb.Image(data=flat, id=str(i)) for i in range(64)])
    heavy_call = embed_pb2_grpc.EmbedStub(grpc.insecure_channel(server.address, options=BIG)).Embed.future(
        heavy, timeout=300
    )
    small = embed_pb2_grpc.EmbedStub(grpc.insecure_channel(server.address))
    try:
        deadline = time.monotonic() + 120
        while server.metric("dinov2_in_flight_images") < 64:  # the heavy request holds the decode workers
            assert time.monotonic() < deadline and not heavy_call.done(), "the heavy request was not taken in"
            time.sleep(0.05)
        for _ in range(5):
            answer = small.Embed(pb.EmbedRequest(images=[pb.Image(data=images.png())]), timeout=120)
            assert answer.embeddings[0].values
            assert not heavy_call.done(), "a small request waited for the whole heavy one"
    finally:
        heavy_call.cancel()
    assert server.peak_rss_bytes() < 2.5 * GB
    after = wait_for_rss_below(server, int(1.5 * GB), within_s=30)
    assert after < 1.5 * GB, f"RSS still {after / GB:.2f} GB 30 s after the load"


def test_two_thousand_connections_get_answers_or_clear_refusals(server: ServerProcess) -> None:
    import asyncio

    data = pb.EmbedRequest(images=[pb.Image(data=images.png(32, 32))])

    async def one(channel: grpc.aio.Channel) -> str:
        try:
            await embed_pb2_grpc.EmbedStub(channel).Embed(data, timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    async def flood() -> Counter[str]:
        channels = [grpc.aio.insecure_channel(server.address) for _ in range(2000)]
        try:
            return Counter(await asyncio.gather(*(one(ch) for ch in channels)))
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))

    outcomes = asyncio.run(flood())
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, outcomes
    assert outcomes["OK"] > 0
    assert server.peak_rss_bytes() < 2.5 * GB
    after = wait_for_rss_below(server, int(1.5 * GB), within_s=30)
    assert after < 1.5 * GB, f"RSS still {after / GB:.2f} GB 30 s after the load"


def test_one_caller_holding_three_thousand_idle_streams_locks_out_neither_others_nor_health(
    model_dir: Path,
) -> None:
    import asyncio

    args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
    with ServerProcess(args, ready_timeout_s=180) as server:

        async def flood() -> tuple[Counter[str], list[str]]:
            relay = Relay(server.port)  # the other caller calls from 127.0.0.2
            flooder = grpc.aio.insecure_channel(server.address)
            other = grpc.aio.insecure_channel(await relay.start())
            streams = [embed_pb2_grpc.EmbedStub(flooder).EmbedStream() for _ in range(3000)]
            deadline = time.monotonic() + 120
            while sum(call.done() for call in streams) < 3000 - 256:  # all but its bound are refused
                assert time.monotonic() < deadline, f"{sum(c.done() for c in streams)} of 3000 streams ended"
                await asyncio.sleep(0.05)
            refused = Counter([(await call.code()).name for call in streams if call.done()])
            outcomes: list[str] = []
            request = pb.EmbedRequest(images=[pb.Image(data=images.png(32, 32))])
            for _ in range(3):
                answer = await embed_pb2_grpc.EmbedStub(other).Embed(request, timeout=60)
                outcomes.append("OK" if answer.embeddings[0].values else "empty")
            for channel in [other, flooder] * 20:
                check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
                outcomes.append(health_pb2.HealthCheckResponse.ServingStatus.Name(check.status))
            await flooder.close()
            await other.close()
            await relay.close()
            return refused, outcomes

        refused, outcomes = asyncio.run(flood())
        assert refused == {"RESOURCE_EXHAUSTED": 3000 - 256}, refused
        assert outcomes == ["OK"] * 3 + ["SERVING"] * 40, outcomes
        assert server.peak_rss_bytes() < 2.5 * GB
        after = wait_for_rss_below(server, int(1.5 * GB), within_s=30)
        assert after < 1.5 * GB, f"RSS still {after / GB:.2f} GB 30 s after the streams closed"


@pytest.mark.parametrize("size_mb", [16, 64])
def test_a_json_body_of_the_wrong_shape_is_refused_within_twice_its_size(
    http_server: ServerProcess, size_mb: int
) -> None:
    """json.loads of 64 MB of `[]` took 1.5 GB; here the body is refused having cost about its own size."""
    body = b"[" + b"[]," * (size_mb * MB // 3) + b"[]]"
    wrapped = b'{"images": ' + body + b"}"
    small = b"[" + b"[]," * 1000 + b"[]]"  # the path's first run (its lazy imports and caches) before idle is read
    assert raw_http.request(http_server.http_port, raw_http.head("POST", "/v1/embed", JSON, len(small)) + small).status
    idle_tree = http_server.rss_bytes()  # the server and its decode workers
    back_within = max(len(body) // 2, 32 * MB)  # CI saw 12 MB of other growth: a kept 64 MB body still fails it
    for sent in (body, wrapped):
        idle = status_kb(http_server.pid, "VmRSS") * 1024
        assert http_server.reset_peak_rss(), "the kernel refused to restart the peak (clear_refs)"
        answer = raw_http.request(http_server.http_port, raw_http.head("POST", "/v1/embed", JSON, len(sent)) + sent)
        peak = status_kb(http_server.pid, "VmHWM") * 1024
        assert answer.status == 400, answer
        message = answer.json()["error"]["message"]
        assert message.startswith("request body holds more JSON values than a request can"), message
        assert peak - idle < 2 * len(sent), (
            f"peak RSS {(peak - idle) / MB:.0f} MB over idle for {len(sent) / MB:.0f} MB"
        )
    after = wait_for_rss_below(http_server, idle_tree + back_within, within_s=30)
    assert after < idle_tree + back_within, f"RSS {(after - idle_tree) / MB:.0f} MB over idle 30 s after"
