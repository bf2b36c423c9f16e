"""The real gRPC server on loopback: contract, parity, errors, health, reflection, batching."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.dinov2.v1 import embed_pb2 as pb
from server.model import Pooling
from tests import images
from tests.conftest import Reference, RunningServer, assert_close

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


def test_stream_answers_in_request_order_and_survives_bad_requests(
    server: RunningServer, reference: Reference
) -> None:
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
    for j, item in enumerate(responses[11].embeddings):
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
    assert info.embedding_dim == 32 and info.image_size == 224
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
    assert all(e.values for e in response.embeddings)
    streamed = list(small.stub.EmbedStream(iter([request([images.png()] * 5)]), timeout=10))
    assert streamed[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


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
        await asyncio.sleep(0.05)

    running.call(drain)
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Embed(request([images.png()]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    status = health_pb2_grpc.HealthStub(running.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
