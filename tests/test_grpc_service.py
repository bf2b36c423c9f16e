"""The real gRPC server on loopback: contract, parity, errors, health, reflection, batching."""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.dinov2.v1 import embed_pb2 as pb
from server import grpc_service
from server.model import Pooling
from tests import images
from tests.conftest import Reference, RunningServer, assert_close, wait_for

POOLINGS = {
    pb.POOLING_UNSPECIFIED: Pooling.CLS,
    pb.POOLING_CLS: Pooling.CLS,
    pb.POOLING_MEAN: Pooling.MEAN,
    pb.POOLING_CLS_MEAN: Pooling.CLS_MEAN,
}


def request(datas: list[bytes], pooling: int = pb.POOLING_CLS, normalize: bool = False) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        images=[pb.Image(data=d, id=f"img-{i}") for i, d in enumerate(datas)], pooling=pooling, normalize=normalize
    )


@pytest.mark.parametrize("pooling", list(POOLINGS))
@pytest.mark.parametrize("normalize", [False, True])
def test_embed_equals_reference_for_every_pooling(
    server: RunningServer, reference: Reference, corpus: dict[str, bytes], pooling: int, normalize: bool
) -> None:
    names = ["png_rgb", "jpeg_cmyk", "png_16bit", "gif_animated", "tiny_1x1", "webp"]
    response = server.stub.Embed(request([corpus[n] for n in names], pooling, normalize), timeout=60)
    assert [e.id for e in response.embeddings] == [f"img-{i}" for i in range(len(names))]
    for name, item in zip(names, response.embeddings, strict=True):
        assert not item.HasField("error")
        expected = reference.embed(corpus[name], POOLINGS[pooling], normalize)
        assert_close(np.array(item.values, dtype=np.float32), expected, name)


def test_bad_images_fail_alone_beside_good_ones(server: RunningServer, reference: Reference) -> None:
    good = images.png(seed=4)
    datas = [good, b"", b"not an image", images.png()[:50], good]
    response = server.stub.Embed(request(datas), timeout=30)
    codes = [e.error.code for e in response.embeddings]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 3, 3, 0]
    assert "empty" in response.embeddings[1].error.message
    assert "not a decodable image" in response.embeddings[2].error.message
    assert "truncated PNG" in response.embeddings[3].error.message
    for i in (0, 4):
        assert_close(np.array(response.embeddings[i].values, np.float32), reference.embed(good), f"item {i}")
        assert len(response.embeddings[i].values) == 32
    assert all(not e.values for e in response.embeddings[1:4])


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (pb.EmbedRequest(), "no images"),
        (request([b"x"] * 257), "257 images, over the limit of 256"),
        (pb.EmbedRequest(images=[pb.Image(data=b"x")], pooling=42), "unknown pooling 42"),
    ],
)
def test_malformed_requests_are_invalid_argument(server: RunningServer, req: pb.EmbedRequest, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Embed(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_stream_answers_in_request_order_and_survives_bad_requests(server: RunningServer, reference: Reference) -> None:
    datas = [images.png(32 + i, 40, seed=i) for i in range(30)]
    requests = [request([d, b"junk"]) for d in datas[:10]]
    requests.insert(5, pb.EmbedRequest())
    requests += [request(datas[10:30:2]), request([datas[11]], pb.POOLING_MEAN, normalize=True)]
    responses = list(server.stub.EmbedStream(iter(requests), timeout=60))
    assert len(responses) == len(requests)
    assert responses[5].error.code == 3 and "no images" in responses[5].error.message
    firsts = responses[:5] + responses[6:11]
    for i, response in enumerate(firsts):
        assert [e.id for e in response.embeddings] == ["img-0", "img-1"]
        assert_close(np.array(response.embeddings[0].values, np.float32), reference.embed(datas[i]), f"stream {i}")
        assert response.embeddings[1].error.code == 3
    multi = responses[11]
    assert not multi.HasField("error") and len(multi.embeddings) == 10, multi.error
    for j, item in enumerate(multi.embeddings):
        assert_close(np.array(item.values, np.float32), reference.embed(datas[10 + 2 * j]), f"multi {j}")
    last = np.array(responses[12].embeddings[0].values, np.float32)
    assert_close(last, reference.embed(datas[11], Pooling.MEAN, normalize=True), "mean")


def test_concurrent_clients_get_their_own_answers_in_shared_batches(
    server: RunningServer, reference: Reference
) -> None:
    datas = [images.png(50, 50, seed=100 + i) for i in range(48)]
    expected = [reference.embed(d) for d in datas]
    before = server.metrics.value("dinov2_batch_size_count"), server.metrics.value("dinov2_batch_size_sum")
    barrier = threading.Barrier(16)

    def client(k: int) -> list[np.ndarray]:
        barrier.wait()
        out = []
        for i in range(k, 48, 16):
            response = server.stub.Embed(request([datas[i]]), timeout=60)
            out.append(np.array(response.embeddings[0].values, np.float32))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    for k, vecs in enumerate(results):
        for j, vec in enumerate(vecs):
            assert_close(vec, expected[k + 16 * j], f"client {k} call {j}")
    batches = server.metrics.value("dinov2_batch_size_count") - before[0]
    images_run = server.metrics.value("dinov2_batch_size_sum") - before[1]
    assert images_run == 48
    assert batches < 48, "no batch of more than one image formed"


def test_info_describes_model_and_limits(server: RunningServer) -> None:
    info = server.stub.Info(pb.InfoRequest(), timeout=10)
    assert info.embedding_dim == 32 and info.image_size == 224 and info.preprocess == "card"
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.max_batch_size == 16 and info.max_images_per_request == 256
    assert info.max_image_bytes == 32 * 1024 * 1024 and info.max_image_pixels == 50_000_000
    assert info.model_id.endswith(("dinov2-tiny0", "dinov2-tiny"))


def test_health_is_serving_for_overall_and_embed(server: RunningServer) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "dinov2.v1.Embed"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"dinov2.v1.Embed", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_serves_prometheus_text(server: RunningServer) -> None:
    server.stub.Embed(request([images.png()]), timeout=10)
    port = server.server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "dinov2_batch_size_bucket" in body
    assert 'dinov2_requests_total{code="OK",method="Embed"}' in body


def test_full_queue_answers_resource_exhausted(make_server) -> None:
    small = make_server(max_queue_images=4)
    with pytest.raises(grpc.RpcError) as info:
        small.stub.Embed(request([images.png()] * 5), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    response = small.stub.Embed(request([images.png()] * 4), timeout=30)
    assert [len(e.values) for e in response.embeddings] == [32] * 4
    streamed = list(small.stub.EmbedStream(iter([request([images.png()] * 5)]), timeout=10))
    assert len(streamed) == 1 and streamed[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_oversized_message_is_refused_with_a_clear_status(make_server) -> None:
    small = make_server(max_request_bytes=10_000)
    with pytest.raises(grpc.RpcError) as info:
        small.stub.Embed(request([b"\x00" * 20_000]), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()


def test_draining_server_refuses_new_work_and_reports_not_serving(make_server) -> None:
    running = make_server()

    async def drain() -> None:
        running.server.service.begin_drain()

    running.call(drain)
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Embed(request([images.png()]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    health = health_pb2_grpc.HealthStub(running.channel)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == not_serving)


def test_a_malformed_body_is_invalid_argument_with_one_warning(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING")
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length past the end
    for method in ("Embed", "Info"):
        call = server.channel.unary_unary(f"/dinov2.v1.Embed/{method}", request_serializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(garbage, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in (info.value.details() or "")
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "not a valid message" in r.getMessage()]
    assert len(warnings) == 2 and not [r for r in caplog.records if r.levelname == "ERROR"]
    assert all(r.exc_info is None for r in caplog.records)


def test_a_malformed_message_in_a_stream_gets_its_own_error(server: RunningServer) -> None:
    stream = server.channel.stream_stream("/dinov2.v1.Embed/EmbedStream", request_serializer=None,
                                          response_deserializer=pb.EmbedResponse.FromString)  # fmt: skip
    good = request([images.png()]).SerializeToString()
    responses = list(stream(iter([good, b"\x0a\xff\xff\xff\xff\x0f", good]), timeout=30))
    assert len(responses) == 3
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[0].embeddings[0].values and responses[2].embeddings[0].values


def test_a_response_over_the_message_limit_is_refused_up_front_and_the_stream_goes_on(
    make_server, reference: Reference
) -> None:
    small = make_server(max_request_bytes=256 * 1024)
    dot, data = images.png(1, 1), images.png()
    long_ids = pb.EmbedRequest(images=[pb.Image(data=dot, id=f"{i:04d}" + "x" * 1196) for i in range(200)])
    assert long_ids.ByteSize() < 256 * 1024 < 200 * (1200 + 4 * 32)  # the answer, not the request, is too big
    with pytest.raises(grpc.RpcError) as info:
        small.stub.Embed(long_ids, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the message limit" in info.value.details()
    responses = list(small.stub.EmbedStream(iter([long_ids, request([data])]), timeout=30))
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "over the message limit" in responses[0].error.message
    assert_close(np.array(responses[1].embeddings[0].values, np.float32), reference.embed(data), "after")


def test_a_client_cancelling_a_stream_is_not_an_error(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    release = threading.Event()
    open_before = server.server.calls.open

    def requests():
        yield request([images.png()])
        release.wait(10)

    call = server.stub.EmbedStream(requests(), timeout=30)
    assert next(call).embeddings[0].values
    call.cancel()
    release.set()
    wait_for(lambda: server.server.calls.open == open_before)  # the server has ended the call
    server.call(asyncio.sleep, 0)  # and finished the loop step that ended it (anything logged, it logged)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


class _TickingClock:
    """`time` for the transport: a clock that moves one second each time it is read, so the order of reads shows."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


class _CallEndingAt:
    """A call context whose deadline, on the same clock, is `at`."""

    def __init__(self, clock: _TickingClock, at: float) -> None:
        self.clock, self.at = clock, at

    def time_remaining(self) -> float:
        return self.at - self.clock.monotonic()


def test_the_services_deadline_for_a_call_is_never_later_than_grpcs(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _TickingClock()
    monkeypatch.setattr(grpc_service, "time", clock)
    # later than gRPC's, the service would see gRPC's cancellation at the deadline as its caller leaving
    assert grpc_service._deadline(_CallEndingAt(clock, at=100.0)) <= 100.0  # type: ignore[arg-type]
