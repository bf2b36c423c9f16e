"""A small gRPC load driver: EmbedStream with a window of requests in flight, and idle unary calls."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc

MAX_MESSAGE = 128 * 1024 * 1024


@dataclass
class StreamResult:
    images: int
    seconds: float
    embeddings: dict[int, np.ndarray] = field(repr=False)  # image index -> CLS embedding, for the first few

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass
class LatencyResult:
    calls: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


def channel(address: str) -> grpc.Channel:
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    return grpc.insecure_channel(address, options=options)


def requests_for(datas: list[bytes], total: int, per_request: int) -> list[pb.EmbedRequest]:
    """`total` images, cycling over `datas`, `per_request` to an EmbedRequest; image ids are their index."""
    out = []
    for start in range(0, total, per_request):
        images = [
            pb.Image(data=datas[i % len(datas)], id=str(i)) for i in range(start, min(start + per_request, total))
        ]
        out.append(pb.EmbedRequest(images=images, pooling=pb.POOLING_CLS))
    return out


def stream(address: str, requests: list[pb.EmbedRequest], window: int, keep: int = 0) -> StreamResult:
    """Sends the requests on one EmbedStream, at most `window` unanswered; times first send to last answer.

    Keeps the embeddings of images with id < keep. Any error fails the run.
    """
    slots = threading.Semaphore(window)

    def produce() -> Iterator[pb.EmbedRequest]:
        for request in requests:
            slots.acquire()
            yield request

    kept: dict[int, np.ndarray] = {}
    images = 0
    with channel(address) as chan:
        stub = embed_pb2_grpc.EmbedStub(chan)
        started = time.perf_counter()
        for response in stub.EmbedStream(produce(), timeout=3600):
            slots.release()
            if response.HasField("error"):
                raise RuntimeError(f"stream request failed: {response.error.message}")
            for item in response.embeddings:
                if item.HasField("error"):
                    raise RuntimeError(f"image {item.id} failed: {item.error.message}")
                index = int(item.id)
                if index < keep:
                    kept[index] = np.asarray(item.values, dtype=np.float32)
            images += len(response.embeddings)
        elapsed = time.perf_counter() - started
    return StreamResult(images, elapsed, kept)


def unary_latency(address: str, datas: list[bytes], calls: int) -> LatencyResult:
    """One image per `Embed` call, one call at a time (an idle server), after two warm-up calls."""
    times: list[float] = []
    with channel(address) as chan:
        stub = embed_pb2_grpc.EmbedStub(chan)
        for i in range(calls + 2):
            request = pb.EmbedRequest(images=[pb.Image(data=datas[i % len(datas)], id=str(i))])
            started = time.perf_counter()
            response = stub.Embed(request, timeout=600)
            elapsed = time.perf_counter() - started
            if response.embeddings[0].HasField("error"):
                raise RuntimeError(f"unary call failed: {response.embeddings[0].error.message}")
            if i >= 2:
                times.append(1000 * elapsed)
    p99 = float(np.percentile(times, 99))
    return LatencyResult(len(times), statistics.median(times), p99, statistics.fmean(times))
