"""Faults, deadlines and cancellation: only the affected work fails, the worker recovers,
and work nobody waits for never reaches the model."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.dinov2.v1 import embed_pb2 as pb
from tests import images
from tests.conftest import ControlledRunner, Reference, RunningServer, assert_close, wait_for


def health(server: RunningServer) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="dinov2.v1.Embed"), timeout=5).status


def missed_its_deadline(call: Callable[[], pb.EmbedResponse]) -> bool:
    """The call failed DEADLINE_EXCEEDED, or was answered just in time with every image DEADLINE_EXCEEDED
    (the server answers at the deadline: which of the two the client sees is a race)."""
    try:
        response = call()
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return all(item.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] for item in response.embeddings)


def believe_fast(server: RunningServer) -> None:
    """Makes the server's clock say decoding and its model are instant, so admission lets a short deadline in."""
    throughput = server.server.service.throughput
    for _ in range(100):
        throughput.forward.observe(1, 0.0)
        throughput.decode.observe(1, 0.0)


def request(n: int, seed: int = 0) -> pb.EmbedRequest:
    return pb.EmbedRequest(images=[pb.Image(data=images.png(40, 40, seed=seed + i), id=str(i)) for i in range(n)])


def test_a_failing_batch_fails_only_its_images_then_the_next_batch_succeeds(
    make_server, runner, reference: Reference
) -> None:
    controlled = ControlledRunner(runner)
    server = make_server(controlled, probe_interval_s=0.1, max_wait_ms=2000)  # the 3 images form one batch
    controlled.fail_batches = 1
    failed = server.stub.Embed(request(3), timeout=30)
    assert [e.error.code for e in failed.embeddings] == [grpc.StatusCode.INTERNAL.value[0]] * 3
    assert "inference failed" in failed.embeddings[0].error.message
    assert "injected" not in failed.embeddings[0].error.message
    ok = server.stub.Embed(request(2, seed=7), timeout=30)
    for i, item in enumerate(ok.embeddings):
        assert_close(np.array(item.values, np.float32), reference.embed(images.png(40, 40, seed=7 + i)), str(i))
    wait_for(lambda: health(server) == health_pb2.HealthCheckResponse.SERVING)
    assert server.metrics.value("dinov2_inference_failures_total") >= 1


def test_health_is_not_serving_while_the_model_fails_and_serving_after(make_server, runner) -> None:
    controlled = ControlledRunner(runner)
    server = make_server(controlled, probe_interval_s=0.1)
    controlled.failing = True
    response = server.stub.Embed(request(1), timeout=30)
    assert response.embeddings[0].error.code == grpc.StatusCode.INTERNAL.value[0]
    wait_for(lambda: health(server) == health_pb2.HealthCheckResponse.NOT_SERVING)
    probes = controlled.calls
    wait_for(lambda: controlled.calls >= probes + 3)  # the prober tried, and failed, three more times
    assert health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    controlled.failing = False
    wait_for(lambda: health(server) == health_pb2.HealthCheckResponse.SERVING)
    assert server.stub.Embed(request(1), timeout=30).embeddings[0].values


def test_expired_unary_requests_never_reach_the_model(make_server, runner) -> None:
    controlled = ControlledRunner(runner)
    server = make_server(controlled, max_wait_ms=0)
    seen_before, calls_before = controlled.images_seen, controlled.calls
    controlled.allow(seen_before)  # the busy image's batch waits in the model until released
    busy = threading.Thread(target=lambda: server.stub.Embed(request(1), timeout=30))
    busy.start()
    wait_for(lambda: controlled.calls > calls_before)
    believe_fast(server)
    assert missed_its_deadline(lambda: server.stub.Embed(request(5, seed=50), timeout=0.15))
    controlled.allow(float("inf"))
    busy.join()
    server.stub.Embed(request(1), timeout=30)
    assert controlled.images_seen - seen_before == 1 + 1  # the busy image and the last one
    dropped = server.metrics.value("dinov2_dropped_images_total", {"reason": "cancelled"}) + server.metrics.value(
        "dinov2_dropped_images_total", {"reason": "deadline"}
    )
    assert dropped == 5


def test_a_stream_cancelled_midway_sends_nothing_more_to_the_model(make_server, runner) -> None:
    controlled = ControlledRunner(runner)
    server = make_server(controlled, max_batch_size=4, max_wait_ms=0)
    value = server.metrics.value
    controlled.delay_s = 0.2
    seen_before = controlled.images_seen
    try:
        call = server.stub.EmbedStream(iter([request(4, seed=10 * k) for k in range(10)]), timeout=60)
        assert len(next(call).embeddings) == 4
        controlled.allow(controlled.images_seen)  # no batch starts in the model from now on
        seen_at_gate = controlled.images_seen
        wait_for(lambda: value("dinov2_in_flight_images") + value("dinov2_images_total", {"outcome": "ok"}) == 40)
        call.cancel()
        wait_for(lambda: value("dinov2_in_flight_images") == 0)  # the server has seen the cancellation
    finally:
        controlled.allow(float("inf"))
    wait_for(lambda: value("dinov2_queue_depth") == 0)
    dropped = "dinov2_dropped_images_total", {"reason": "cancelled"}
    wait_for(lambda: controlled.images_seen - seen_before + value(*dropped) == 40)
    # At most the batch in the model when the gate closed and the one held at it; the rest never run.
    assert controlled.images_seen - seen_at_gate <= 8


def test_images_whose_deadline_passed_are_counted_as_deadline_not_cancelled(make_server, runner) -> None:
    controlled = ControlledRunner(runner)
    server = make_server(controlled, max_batch_size=1)
    dropped = server.metrics.value
    controlled.allow(0)  # the first image waits in the model past the deadline; the other three, behind it
    try:  # a deadline that leaves a loaded machine time to deliver the call before it passes
        assert missed_its_deadline(lambda: server.stub.Embed(request(4), timeout=2))
    finally:
        controlled.allow(float("inf"))  # the batch waiting behind the model's counts its image once it may run
    wait_for(lambda: dropped("dinov2_dropped_images_total", {"reason": "deadline"}) >= 3, timeout=30)
    assert dropped("dinov2_dropped_images_total", {"reason": "cancelled"}) == 0
