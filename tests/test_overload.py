"""Load on loopback at several times capacity: excess work is refused fast with RESOURCE_EXHAUSTED
(by count, or by the time it would take), accepted work completes correctly, the queue stays bounded."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from protos.dinov2.v1 import embed_pb2 as pb
from tests import images
from tests.conftest import ControlledRunner, Reference, assert_close, wait_for

CLIENTS = 24
REQUESTS_PER_CLIENT = 12
IMAGES_PER_REQUEST = 4
QUEUE_BOUND = 32


def test_overload_is_refused_fast_and_accepted_work_is_correct(
    make_server, runner, reference: Reference
) -> None:
    controlled = ControlledRunner(runner)
    controlled.delay_s = 0.05
    server = make_server(controlled, max_queue_images=QUEUE_BOUND, max_batch_size=8, max_wait_ms=2)
    pictures = [images.png(40, 40, seed=300 + i) for i in range(8)]
    expected = [reference.embed(p) for p in pictures]
    peak = {"in_flight": 0.0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak["in_flight"] = max(peak["in_flight"], server.metrics.value("dinov2_in_flight_images"))
            time.sleep(0.002)

    def client(k: int) -> list[tuple[str, float]]:
        outcomes = []
        for r in range(REQUESTS_PER_CLIENT):
            chosen = [(k + r + i) % len(pictures) for i in range(IMAGES_PER_REQUEST)]
            request = pb.EmbedRequest(images=[pb.Image(data=pictures[c], id=str(c)) for c in chosen])
            started = time.monotonic()
            try:
                response = server.stub.Embed(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "retry" in exc.details()
                outcomes.append(("refused", time.monotonic() - started))
                continue
            for item in response.embeddings:
                assert_close(np.array(item.values, np.float32), expected[int(item.id)], item.id)
            outcomes.append(("ok", time.monotonic() - started))
        return outcomes

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [o for result in pool.map(client, range(CLIENTS)) for o in result]
    done.set()
    watcher.join()

    refused = sorted(t for kind, t in outcomes if kind == "refused")
    accepted = sorted(t for kind, t in outcomes if kind == "ok")
    assert refused and accepted, f"{len(refused)} refused, {len(accepted)} accepted"
    assert refused[len(refused) // 2] < 0.1, f"median refusal took {refused[len(refused) // 2]:.3f} s"
    assert accepted[-1] < 10, f"slowest accepted request took {accepted[-1]:.1f} s"
    assert peak["in_flight"] <= QUEUE_BOUND
    assert server.metrics.value("dinov2_in_flight_images") == 0
    refused_count = server.metrics.value("dinov2_requests_total", {"method": "Embed", "code": "RESOURCE_EXHAUSTED"})
    assert refused_count == len(refused)


def test_a_call_that_would_miss_its_deadline_is_refused_at_once_with_the_estimated_wait(make_server, runner) -> None:
    controlled = ControlledRunner(runner)
    controlled.delay_s = 0.3  # every pass, the start's timed one included: the server's measured speed
    server = make_server(controlled, max_batch_size=2, max_wait_ms=0)
    picture = images.png(40, 40, seed=1)
    seen = controlled.images_seen
    controlled.allow(seen)  # passes from now on wait in the model: the work ahead stays ahead
    ahead = server.stub.Embed.future(pb.EmbedRequest(images=[pb.Image(data=picture)] * 16), timeout=120)
    wait_for(lambda: server.metrics.value("dinov2_in_flight_images") == 16)
    try:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=picture)] * 2), timeout=2)
    finally:
        controlled.allow(float("inf"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.search(r"would be answered in about [\d.]+ s \(\d+ images ahead of it, 2 in it", info.value.details())
    assert len(ahead.result().embeddings) == 16
    assert server.metrics.value("dinov2_refused_requests_total", {"reason": "deadline"}) == 1
    assert server.metrics.value("dinov2_dropped_images_total", {"reason": "deadline"}) == 0
