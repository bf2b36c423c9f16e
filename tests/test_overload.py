"""A bounded load test on loopback at several times capacity: excess work is refused fast
with RESOURCE_EXHAUSTED, accepted work completes correctly, the queue stays bounded."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from protos.dinov2.v1 import embed_pb2 as pb
from tests import images
from tests.conftest import ControlledRunner, Reference, assert_close

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
