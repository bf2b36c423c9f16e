"""The gRPC transport: `dinov2.v1.Embed` over the shared `EmbedService`.

Thin on purpose: protobuf in, `EmbedService.embed`, protobuf out. Engine
errors become gRPC codes here and nowhere else (`STATUS_OF`). Requests are
parsed here too (`add_to_server`), so that a malformed body is answered
INVALID_ARGUMENT with one warning rather than gRPC's UNKNOWN and a traceback.
When the server drains (`EmbedServicer.drain`), every stream stops reading:
it sends the answers in flight, then ends UNAVAILABLE, so that an idle
stream does not hold the drain for its whole grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos.dinov2.v1 import embed_pb2, embed_pb2_grpc
from server import errors
from server.callers import CALLER
from server.model import Pooling
from server.receive_slots import ReceiveSlots
from server.service import EmbedOptions, EmbedService, ImageResult, Lane
from server.tokens import TokenOptions

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.EmbedError], grpc.StatusCode] = {
    errors.InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.InferenceFailed: grpc.StatusCode.INTERNAL,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

SERVICE_NAME = embed_pb2.DESCRIPTOR.services_by_name["Embed"].full_name
DRAINING = "server is draining: send the rest to another server"
_ERROR_BYTES = 512  # room for one image's error in a response
_PARSE_ON_LOOP_BYTES = 16 << 20
"""A larger request is parsed in a thread (126 MB held the GIL 10-60 ms); a smaller one on the loop: a thread hop
for each 3.4 MB request cost 0.3 ms of server CPU per image (bench --http --size null, 2-core machine)."""
_PER_ITEM_BYTES = 24  # tags and lengths of one Embedding

_POOLING = {
    embed_pb2.POOLING_UNSPECIFIED: Pooling.CLS,
    embed_pb2.POOLING_CLS: Pooling.CLS,
    embed_pb2.POOLING_MEAN: Pooling.MEAN,
    embed_pb2.POOLING_CLS_MEAN: Pooling.CLS_MEAN,
}


def status_of(exc: errors.EmbedError) -> grpc.StatusCode:
    return STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)


def error_message(exc: errors.EmbedError) -> embed_pb2.Error:
    """The wire form of an engine error: google.rpc.Code number and message."""
    return embed_pb2.Error(code=status_of(exc).value[0], message=str(exc))


_TOKEN_DTYPE = {
    embed_pb2.TOKEN_DTYPE_UNSPECIFIED: "float32",
    embed_pb2.TOKEN_DTYPE_FLOAT32: "float32",
    embed_pb2.TOKEN_DTYPE_FLOAT16: "float16",
    embed_pb2.TOKEN_DTYPE_BFLOAT16: "bfloat16",
}
_TOKEN_DTYPE_NUMBER = {name: number for number, name in _TOKEN_DTYPE.items() if number}


def _options(request: embed_pb2.EmbedRequest) -> EmbedOptions:
    pooling = _POOLING.get(request.pooling)
    if pooling is None:
        raise errors.InvalidRequest(f"unknown pooling {request.pooling}")
    tokens = None
    if request.patch_tokens.enabled:
        dtype = _TOKEN_DTYPE.get(request.patch_tokens.dtype)
        if dtype is None:
            raise errors.InvalidRequest(f"unknown patch token dtype {request.patch_tokens.dtype}")
        tokens = TokenOptions(dtype, request.patch_tokens.normalize)
    return EmbedOptions(pooling=pooling, normalize=request.normalize, patch_tokens=tokens)


class MalformedRequest:
    """What a request body that does not parse becomes; the RPC answers INVALID_ARGUMENT."""

    def __init__(self, reason: str) -> None:
        self.message = f"request body is not a valid message of this RPC: {reason}"


@dataclass(frozen=True)
class _Sized:
    """An `EmbedRequest` and its size on the wire (upb's `ByteSize()` serializes the message again)."""

    request: embed_pb2.EmbedRequest
    nbytes: int


def _lenient(parse: Callable[[bytes], Any], sized: bool = False) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            message = parse(raw)
        except DecodeError as exc:
            return MalformedRequest(str(exc)[:200] or "cannot be parsed")
        return _Sized(message, len(raw)) if sized else message

    return deserialize


_parse_embed_request = _lenient(embed_pb2.EmbedRequest.FromString, sized=True)


async def parsed(raw: bytes) -> _Sized | MalformedRequest:
    """An `EmbedRequest` from its bytes: a large one parsed off the event loop, which every caller shares."""
    if len(raw) < _PARSE_ON_LOOP_BYTES:
        return _parse_embed_request(raw)
    return await asyncio.to_thread(_parse_embed_request, raw)


def add_to_server(servicer: EmbedServicer, server: grpc.aio.Server) -> None:
    """Registers `dinov2.v1.Embed` (as the generated code would, with lenient request parsing; `EmbedRequest`s
    arrive as bytes and are parsed by the servicer, `parsed`)."""
    response, info = embed_pb2.EmbedResponse, embed_pb2.InfoResponse
    handlers = {
        # Unary on the wire, read by the servicer itself (see EmbedServicer.Embed).
        "Embed": grpc.stream_unary_rpc_method_handler(servicer.Embed, None, response.SerializeToString),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(servicer.EmbedStream, None, response.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, _lenient(embed_pb2.InfoRequest.FromString), info.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _ImageBytes(Sequence[bytes]):
    """A request's image bytes, read one at a time when decoded (not all copied up front)."""

    def __init__(self, images: Any) -> None:
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self._images[index].data


def _check_response_size(request: embed_pb2.EmbedRequest, embedding_dim: int, token_bytes: int, limit: int) -> None:
    """Refuses a request whose answer could pass the message limit (ids are echoed back; `token_bytes`:
    one image's patch tokens, 0 when not asked)."""
    values = 4 * _POOLING.get(request.pooling, Pooling.CLS).size(embedding_dim)
    if token_bytes:
        values += _PER_ITEM_BYTES + token_bytes
    per_item = _PER_ITEM_BYTES + max(values, _ERROR_BYTES)
    size = 128 + sum(per_item + len(image.id.encode()) for image in request.images)
    if size > limit:
        raise errors.InvalidRequest(
            f"the response to this request could be {size} bytes, over the message limit of {limit}: "
            "send fewer images or shorter ids"
        )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a `time.monotonic()` instant, never after gRPC's own: the clock is read
    before the time left, so the copy errs early, not late (server/deadlines.py says why that matters)."""
    now = time.monotonic()
    remaining = context.time_remaining()
    return None if remaining is None else now + remaining


def _request_deadline(request: embed_pb2.EmbedRequest, call_deadline: float | None, arrived: float) -> float | None:
    """The earlier of the call's deadline and the request's own `timeout_ms` from its arrival."""
    if not request.timeout_ms:
        return call_deadline
    own = arrived + request.timeout_ms / 1000.0
    return own if call_deadline is None else min(own, call_deadline)


def _response(request: embed_pb2.EmbedRequest, results: list[ImageResult], started: float) -> embed_pb2.EmbedResponse:
    response = embed_pb2.EmbedResponse()
    for image, result in zip(request.images, results, strict=True):
        item = response.embeddings.add(id=image.id)
        if result.error is not None:
            item.error.CopyFrom(error_message(result.error))
        else:
            item.values.extend(result.embedding.tolist())  # type: ignore[union-attr]
            if (tokens := result.patch_tokens) is not None:
                item.patch_tokens.rows, item.patch_tokens.cols = tokens.rows, tokens.cols
                item.patch_tokens.dim = tokens.dim
                item.patch_tokens.dtype = _TOKEN_DTYPE_NUMBER[tokens.dtype]
                item.patch_tokens.data = tokens.data
    timing = response.timing
    timing.preprocess_ms = 1000 * max(r.preprocess_s for r in results)
    timing.queue_ms = 1000 * max(r.queue_s for r in results)
    timing.inference_ms = 1000 * max(r.inference_s for r in results)
    timing.total_ms = 1000 * (time.monotonic() - started)
    return response


class EmbedServicer(embed_pb2_grpc.EmbedServicer):
    """Embed, EmbedStream and Info on one shared engine."""

    def __init__(self, service: EmbedService, slots: ReceiveSlots | None = None) -> None:
        """`slots` bound the bodies read at once (`max_receiving_requests`, per caller and in all), shared with
        the HTTP transport."""
        self._service = service
        self._metrics = service.metrics
        settings = service.settings
        self._slots = slots or ReceiveSlots(settings.max_receiving_requests, settings.max_receiving_per_caller)
        self._readers: set[asyncio.Future[None]] = set()  # the request readers of the streams open now
        self._draining = False

    def drain(self) -> None:
        """Stops every stream's reading: each sends its answers in flight, then ends UNAVAILABLE."""
        self._draining = True
        for reader in list(self._readers):
            reader.cancel()

    async def _embed(
        self, received: _Sized | MalformedRequest, deadline: float | None, lane: Lane | None = None
    ) -> embed_pb2.EmbedResponse:
        started = time.monotonic()
        try:
            if isinstance(received, MalformedRequest):
                raise errors.InvalidRequest(received.message)
            request = received.request
            options = _options(request)
            service = self._service
            token_bytes = service.patch_token_bytes(options)
            _check_response_size(request, service.info.embedding_dim, token_bytes, service.settings.max_request_bytes)
            results = await service.embed(
                _ImageBytes(request.images), options, _request_deadline(request, deadline, started),
                nbytes=received.nbytes, lane=lane,
            )  # fmt: skip
        except errors.EmbedError as exc:
            level = logging.WARNING if isinstance(received, MalformedRequest) else logging.INFO
            log.log(level, "request refused: %s: %s", status_of(exc).name, exc)
            raise
        for index, result in enumerate(results):
            if result.error is not None:
                log.debug("image %d (id %r) failed: %s", index, request.images[index].id[:100], result.error)
        response = _response(request, results, started)
        log.debug("embedded %d images in %.1f ms", len(results), response.timing.total_ms)
        return response

    async def Embed(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> embed_pb2.EmbedResponse:
        """A unary call whose body is read only once a receive slot is free.

        gRPC reads a unary body before calling a unary handler, so N callers
        would cost N bodies at once. Registered as stream-unary, a waiting
        caller's body stays in its HTTP/2 flow-control window (BDP probing is
        off, server/app.py) until `max_receiving_requests` allows the read.
        """
        deadline = _deadline(context)
        try:
            response = await self._embed(await self._receive(requests, deadline), deadline)
        except errors.EmbedError as exc:
            refusal = (status_of(exc), str(exc))
        else:
            self._metrics.requests.labels("Embed", "OK").inc()
            return response
        # Aborted outside the except block: the error's traceback holds the request (and its
        # image bytes) until collected, and AbortError would chain it.
        self._metrics.requests.labels("Embed", refusal[0].name).inc()
        await context.abort(*refusal)

    async def _receive(self, requests: AsyncIterator[bytes], deadline: float | None) -> _Sized | MalformedRequest:
        """The call's request, read in a receive slot (waited for until the call's deadline, at most
        `max_queue_s`) and parsed in it."""
        settings = self._service.settings
        wait_until = time.monotonic() + settings.max_queue_s
        async with self._slots.slot(CALLER.get(), wait_until if deadline is None else min(deadline, wait_until)):
            try:
                async with asyncio.timeout(settings.receive_timeout_s):
                    raw = await anext(requests, None)
            except TimeoutError:
                raise errors.InvalidRequest(
                    f"the request body did not arrive within {settings.receive_timeout_s:g} s"
                ) from None
            if raw is None:
                raise errors.InvalidRequest("the call ended without a request")
            return await parsed(raw)

    async def EmbedStream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[embed_pb2.EmbedResponse]:
        """Up to `stream_window` requests in flight; responses in request order.

        A request is read only once it has a place in the window, so a drain
        (`drain` cancels the reader) loses none read. When the call ends,
        however it ends, its outstanding work is cancelled at once
        (`add_done_callback`): a generator suspended at `yield` would only run
        its `finally` when collected.
        """
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        deadline = _deadline(context)
        places = asyncio.Semaphore(self._service.settings.stream_window)
        answers: asyncio.Queue[asyncio.Task[embed_pb2.EmbedResponse] | None] = asyncio.Queue()
        outstanding: set[asyncio.Future[Any]] = set()

        def track(task: asyncio.Future[Any]) -> asyncio.Future[Any]:
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
            return task

        def cancel_outstanding(*_: object) -> None:
            for task in list(outstanding):
                task.cancel()

        context.add_done_callback(cancel_outstanding)
        lane = self._service.new_lane()

        async def read() -> None:
            while True:
                await places.acquire()
                request = await anext(request_iterator, None)
                if request is None:
                    return
                answers.put_nowait(track(asyncio.ensure_future(self._stream_one(request, deadline, lane))))

        def read_done(reader: asyncio.Future[None]) -> None:  # also when cancelled before it ran
            self._readers.discard(reader)
            answers.put_nowait(None)

        reader = track(asyncio.ensure_future(read()))
        self._readers.add(reader)
        reader.add_done_callback(read_done)
        try:
            while (task := await answers.get()) is not None:
                places.release()
                yield await task
            if reader.cancelled() and self._draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
            await reader
        finally:
            cancel_outstanding()

    async def _stream_one(self, raw: bytes, deadline: float | None, lane: Lane) -> embed_pb2.EmbedResponse:
        try:
            response = await self._embed(await parsed(raw), deadline, lane)
        except errors.EmbedError as exc:
            self._metrics.requests.labels("EmbedStream", status_of(exc).name).inc()
            return embed_pb2.EmbedResponse(error=error_message(exc))
        self._metrics.requests.labels("EmbedStream", "OK").inc()
        return response

    async def Info(self, request: embed_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> embed_pb2.InfoResponse:
        if isinstance(request, MalformedRequest):
            log.warning("request refused: INVALID_ARGUMENT: %s", request.message)
            self._metrics.requests.labels("Info", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        self._metrics.requests.labels("Info", "OK").inc()
        return embed_pb2.InfoResponse(**vars(self._service.info))
