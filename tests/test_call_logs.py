"""What the server logs for calls that end early: no ERROR and no traceback for what is not an error.

A compressed request is refused UNIMPLEMENTED by gRPC core, and a client cancelling a stream is
not an error (README, Errors and limits). grpc.aio logs an ERROR with a traceback when a handler's
send fails on a call that core has already ended, unless it noticed the end first: a race, so
the tests repeat their calls. `CallTasks` waits, without sleeping, until the server has handled them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import grpc
import pytest

from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from tests import images
from tests.conftest import ControlledRunner, RunningServer


class CallTasks:
    """Counts the calls a server has begun and finished handling, on its event loop.

    grpc.aio handles each call in a task running `_handle_exceptions` (named
    `HandleExceptions[<method>]`), which ends once grpc has logged all it logs for the call.
    """

    def __init__(self, server: RunningServer) -> None:
        self._server = server
        self.begun = 0
        self.finished: list[str] = []  # method names, in the order their calls ended
        self._changed = threading.Condition()
        server.call(self._install)

    async def _install(self) -> None:
        asyncio.get_running_loop().set_task_factory(self._task)

    def _task(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if getattr(coro, "__name__", "") == "_handle_exceptions":
            with self._changed:
                self.begun += 1
            task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task) -> None:
        with self._changed:
            self.finished.append(task.get_name().removeprefix("HandleExceptions[").removesuffix("]"))
            self._changed.notify_all()

    def wait_all_finished(self, timeout: float = 120.0) -> list[str]:
        """Waits until every call begun so far has been handled; returns their methods, then collects garbage.

        The collection makes anything left for the collector (a task whose exception nobody read,
        a generator never closed) report now, in the log being checked.
        """
        with self._changed:
            done = self._changed.wait_for(lambda: len(self.finished) == self.begun, timeout)
            assert done, f"the server handled {len(self.finished)} of {self.begun} calls within {timeout} s"
            methods = list(self.finished)

        async def collect() -> None:
            gc.collect()

        self._server.call(collect)
        return methods


def noisy(records: Sequence[logging.LogRecord]) -> list[str]:
    """Records at WARNING or above, or with a traceback: what a call ending early must not leave."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()[:300]}" for r in records if r.levelno >= logging.WARNING or r.exc_info
    ]


def request(n: int = 1, id_chars: int = 0, seed: int = 0) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        images=[pb.Image(data=images.png(seed=seed + i), id=f"{seed + i}:" + "x" * id_chars) for i in range(n)]
    )


EMBED, EMBED_STREAM = "/dinov2.v1.Embed/Embed", "/dinov2.v1.Embed/EmbedStream"


def test_a_refused_compressed_call_logs_no_error(make_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_server()
    calls = CallTasks(server)
    caplog.clear()
    for _ in range(25):
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Embed(request(), compression=grpc.Compression.Gzip, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as info:
            list(server.stub.EmbedStream(iter([request()]), compression=grpc.Compression.Gzip, timeout=30))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Core hands the calls of one method to the server in the order they came, so once these
    # are handled, so is every refused call before them that reached the server at all.
    _, call = server.stub.Embed.with_call(request(), timeout=30)
    assert dict(call.initial_metadata())["x-request-id"]
    assert len(list(server.stub.EmbedStream(iter([request()]), timeout=30))) == 1
    methods = calls.wait_all_finished()
    assert methods.count(EMBED) > 1 and methods.count(EMBED_STREAM) > 1  # refused calls did reach the server
    assert not noisy(caplog.records)


class CountingRunner(ControlledRunner):
    """The real runner, with its gate; a test can wait until batches have entered it, or images left it."""

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self.entered = 0  # batches handed to the model, counted before the gate
        self._changed = threading.Condition()

    def embed(self, pixels: Any) -> Any:
        with self._changed:
            self.entered += 1
            self._changed.notify_all()
        result = super().embed(pixels)
        with self._changed:
            self._changed.notify_all()
        return result

    def wait_until(self, condition: Callable[[], bool], timeout: float = 120.0) -> None:
        with self._changed:
            assert self._changed.wait_for(condition, timeout), "the model did not get there"

    def wait_embedded(self, images: int) -> None:
        self.wait_until(lambda: self.images_seen >= images)


def test_a_client_cancelling_a_stream_while_answers_wait_to_be_sent_logs_no_error(
    make_server, runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    counting = CountingRunner(runner)
    server = make_server(counting)
    calls = CallTasks(server)
    # Answers of about 1 MB (ids are echoed), more than the client's flow-control window, which
    # its channel does not grow: after the first, the server is writing when the client cancels.
    with grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = embed_pb2_grpc.EmbedStub(channel)
        caplog.clear()
        cancels = 6
        for _ in range(cancels):
            requests = [request(3, id_chars=350_000, seed=3 * k) for k in range(5)]
            embedded = counting.images_seen
            call = stub.EmbedStream(iter(requests), timeout=60)
            assert len(next(call).embeddings) == 3
            counting.wait_embedded(embedded + 15)  # every answer is made; the server is sending them
            call.cancel()
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
        assert calls.wait_all_finished() == [EMBED_STREAM] * cancels
    assert not noisy(caplog.records)


def test_a_client_cancelling_a_stream_while_requests_are_in_the_model_logs_no_error(
    make_server, runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    counting = CountingRunner(runner)
    server = make_server(counting, max_batch_size=3, max_wait_ms=0)
    calls = CallTasks(server)
    caplog.clear()
    first_answered = threading.Event()

    def requests() -> Iterator[pb.EmbedRequest]:
        yield request(3)
        first_answered.wait(60)
        yield from (request(3, seed=3 * k) for k in range(1, 4))

    counting.allow(counting.images_seen + 3)  # the first request passes; the others wait in the model
    try:
        call = server.stub.EmbedStream(requests(), timeout=60)
        assert len(next(call).embeddings) == 3
        entered = counting.entered
        first_answered.set()
        counting.wait_until(lambda: counting.entered > entered)  # a batch of the others is in the model
        call.cancel()
        assert calls.wait_all_finished() == [EMBED_STREAM]
    finally:
        first_answered.set()
        counting.allow(float("inf"))
    assert server.stub.Embed(request(), timeout=30).embeddings[0].values  # the server still answers
    calls.wait_all_finished()
    assert not noisy(caplog.records)
