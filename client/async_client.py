"""`AsyncEmbedClient`: images in, embeddings out, over `EmbedStream`, for asyncio code.

The heart of the client; `EmbedClient` runs this on a background event loop.
A job reads its input lazily, `batch_size` images per request, keeps up to
`window` requests in flight (spread round-robin over the servers' streams;
fewer while the server is busy, client/window.py), retries refused requests
with backoff (client/sender.py), and hands results back in input order.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from client.connection import DEFAULT_MAX_MESSAGE_BYTES, ConnectionOptions, RetryPolicy
from client.errors import EmbedItemsError, EmbedRequestError, ItemError, ItemResult
from client.images import Item, encode_many, take
from client.sender import Sender
from client.streams import Lanes
from client.tokens import host_dtype, stack_tokens, token_bytes, token_options
from client.window import AdaptiveWindow, AsyncGate
from protos.dinov2.v1 import embed_pb2, embed_pb2_grpc

POOLINGS = {"cls": embed_pb2.POOLING_CLS, "mean": embed_pb2.POOLING_MEAN, "cls_mean": embed_pb2.POOLING_CLS_MEAN}
"""Pooling names accepted everywhere (the proto's enum numbers are accepted too)."""

_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_MESSAGE_OVERHEAD = 64 * 1024  # room for protobuf framing and ids inside max_message_bytes
_ITEM_OVERHEAD = 1024  # an answer's framing and echoed id, beside its values
_WIRE_S = 5.0  # beyond a request's timeout, time for its answer to arrive


def pooling_value(pooling: str | int) -> int:
    if isinstance(pooling, str):
        try:
            return POOLINGS[pooling.lower()]
        except KeyError:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}") from None
    return int(pooling)


def stack(results: list[ItemResult]) -> np.ndarray:
    """Results as an [N, D] float32 array; raises `EmbedItemsError` (NaN rows at failures) if any failed."""
    dim = next((r.embedding.shape[0] for r in results if r.embedding is not None), 0)
    array = np.full((len(results), dim), np.nan, dtype=np.float32)
    for row, result in enumerate(results):
        if result.embedding is not None:
            array[row] = result.embedding
    if any(not r.ok for r in results):
        raise EmbedItemsError(results, array)
    return array


class AsyncEmbedClient:
    """Embeds images with a DINOv2 embedding service (asyncio).

    `target`: a `host:port`, a list of them (each request goes to the next
    server), or a `dns:///name:port` target (gRPC round-robin over its addresses).
    `timeout`: seconds the server may take to answer one request (up to
    `batch_size` images) once it has it; it is sent with the request, so a
    server that cannot make it refuses at once (and the request is tried again
    later), and it never counts the time a request waits behind the job's own
    earlier ones. None: no limit. `batch_size`, `window`: images per request and
    most requests in flight, the defaults of every call (the window shrinks
    while the server is busy and grows back). See `ConnectionOptions` for
    `tls`, `tls_ca`, `api_key`, `max_message_bytes`; `retry` for the backoff.

    Use as `async with AsyncEmbedClient(...) as client:` or call `close()`.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "localhost:50051",
        *,
        timeout: float | None = 60.0,
        batch_size: int = 32,
        window: int = 8,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        self.connection = ConnectionOptions.build(
            target, tls=tls, tls_ca=tls_ca, api_key=api_key, max_message_bytes=max_message_bytes,
            retry=retry, channel_options=channel_options,
        )  # fmt: skip
        self.timeout = timeout
        self.batch_size = _positive("batch_size", batch_size)
        self.window = _positive("window", window)
        self._channels: list[grpc.aio.Channel] | None = None
        self._next_channel = 0

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, None
        for channel in channels or ():
            await channel.close()

    def _opened(self) -> list[grpc.aio.Channel]:
        if self._channels is None:  # opened lazily, inside the loop that uses them
            self._channels = self.connection.open_channels()
        return self._channels

    async def info(self, timeout: float | None = None) -> embed_pb2.InfoResponse:
        """What the (next) server runs: model, embedding size, dtype, device and limits."""
        timeout = self.timeout if timeout is None else timeout
        channels = self._opened()
        retry = self.connection.retry
        started = time.monotonic()
        attempt = 0
        while True:
            channel = channels[self._next_channel % len(channels)]
            self._next_channel += 1
            try:
                stub = embed_pb2_grpc.EmbedStub(channel)
                return await stub.Info(embed_pb2.InfoRequest(), timeout=timeout, metadata=self.connection.metadata)
            except grpc.aio.AioRpcError as exc:
                code, message = exc.code().value[0], exc.details() or exc.code().name
                if not retry.should_retry(code, message, attempt, time.monotonic() - started):
                    raise EmbedRequestError(code, message, (), attempt + 1) from None
                pause = retry.pause(code, message, attempt, started)
            await asyncio.sleep(pause)
            attempt += 1

    async def embed(
        self,
        images: Iterable[Any] | AsyncIterable[Any],
        *,
        ids: Sequence[str] | None = None,
        pooling: str | int = "cls",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Embeds every image; returns a float32 array [N, D] in input order.

        Raises `EmbedItemsError` if any image failed (it names them and holds
        the other rows), `EmbedRequestError` if a request failed after retries.
        No images give a [0, D] array, D from the server's `Info`.
        """
        images = _paired(images, ids)
        results: list[ItemResult] = []
        async for batch in self.embed_batches(
            images, pooling=pooling, normalize=normalize, batch_size=batch_size, window=window, timeout=timeout
        ):
            results.extend(batch)
        if not results:
            info = await self.info(timeout=timeout)
            wide = pooling_value(pooling) == embed_pb2.POOLING_CLS_MEAN
            return np.empty((0, info.embedding_dim * (2 if wide else 1)), dtype=np.float32)
        return stack(results)

    async def patch_tokens(
        self,
        images: Iterable[Any] | AsyncIterable[Any],
        *,
        ids: Sequence[str] | None = None,
        dtype: str = "float16",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Every image's patch tokens (CLS and registers excluded): [N, rows, cols, dim] in input order.

        `dtype` float32 (as computed), float16 or bfloat16 (half the bytes on
        the wire; bfloat16 arrives widened to float32); `normalize`:
        L2-normalize each token. Requests are cut small enough for their
        answers to fit one message. Raises as `embed` does.
        """
        images = _paired(images, ids)
        results: list[ItemResult] = []
        async for batch in self.embed_batches(
            images, batch_size=batch_size, window=window, timeout=timeout, patch_tokens=dtype,
            normalize_tokens=normalize,
        ):  # fmt: skip
            results.extend(batch)
        info = await self.info(timeout=timeout) if not any(r.ok for r in results) else None
        side = info.image_size // max(1, info.patch_size) if info is not None else 0
        return stack_tokens(results, (side, side, info.embedding_dim if info else 0), host_dtype(dtype))

    async def embed_iter(
        self,
        images: Iterable[Any] | AsyncIterable[Any],
        *,
        pooling: str | int = "cls",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
        patch_tokens: str | None = None,
        normalize_tokens: bool = False,
    ) -> AsyncIterator[ItemResult]:
        """Streams results in input order, one `ItemResult` per input; failed images carry `error`.

        Reads `images` lazily (bare images or `(id, image)` pairs), so memory
        stays bounded by `batch_size x window`. Raises `EmbedRequestError` when a
        whole request fails after retries. `patch_tokens` (a dtype name) also
        asks for each image's patch tokens (`ItemResult.patch_tokens`).
        """
        async for batch in self.embed_batches(
            images, pooling=pooling, normalize=normalize, batch_size=batch_size, window=window, timeout=timeout,
            patch_tokens=patch_tokens, normalize_tokens=normalize_tokens,
        ):  # fmt: skip
            for result in batch:
                yield result

    async def embed_batches(
        self,
        images: Iterable[Any] | AsyncIterable[Any],
        *,
        pooling: str | int = "cls",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
        patch_tokens: str | None = None,
        normalize_tokens: bool = False,
    ) -> AsyncIterator[list[ItemResult]]:
        """`embed_iter`, one list per request: cheaper when results cross threads."""
        batch_size = _positive("batch_size", batch_size or self.batch_size)
        window = _positive("window", window or self.window)
        timeout = self.timeout if timeout is None else timeout
        template = embed_pb2.EmbedRequest(
            pooling=pooling_value(pooling), normalize=normalize, timeout_ms=_timeout_ms(timeout)
        )
        if patch_tokens is not None:
            template.patch_tokens.CopyFrom(token_options(patch_tokens, normalize_tokens))
            batch_size = await self._token_batch_size(batch_size, patch_tokens, timeout)
        retry = self.connection.retry
        sender = Sender(
            Lanes(self._opened(), self.connection.metadata, answer_within(timeout)),
            AsyncGate(AdaptiveWindow(window, retry.on_window)),
            retry,
            template,
        )
        in_flight: deque[asyncio.Task[list[ItemResult]]] = deque()
        requests = self._requests(images, batch_size).__aiter__()
        exhausted = False
        place = itertools.count()  # each request's place in the job: earlier ones take free slots first
        try:
            while True:
                while not exhausted and len(in_flight) < window:
                    try:
                        items = await requests.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    in_flight.append(asyncio.ensure_future(sender.run(next(place), items)))
                if not in_flight:
                    return
                yield await in_flight.popleft()
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            await sender.close()

    async def _token_batch_size(self, batch_size: int, dtype: str, timeout: float | None) -> int:
        """`batch_size`, lowered so that the patch tokens of a request's answer fit one message."""
        info = await self.info(timeout=timeout)
        each = token_bytes(info, dtype) + 8 * info.embedding_dim + _ITEM_OVERHEAD  # tokens, pooled values, id
        room = self.connection.max_message_bytes - _MESSAGE_OVERHEAD
        return max(1, min(batch_size, room // each))

    async def _requests(self, images: Iterable[Any] | AsyncIterable[Any], batch_size: int) -> AsyncIterator[list[Item]]:
        """The input cut into requests, read and encoded off the event loop."""
        start = 0
        if isinstance(images, AsyncIterable):
            pending: list[Any] = []
            async for element in images:
                pending.append(element)
                if len(pending) == batch_size:
                    for request in self._split(await asyncio.to_thread(encode_many, pending, start)):
                        yield request
                    start += len(pending)
                    pending = []
            if pending:
                for request in self._split(await asyncio.to_thread(encode_many, pending, start)):
                    yield request
            return
        iterator: Iterator[Any] = iter(images)
        while True:
            items = await asyncio.to_thread(_take_and_encode, iterator, batch_size, start)
            if not items:
                return
            start += len(items)
            for request in self._split(items):
                yield request

    def _split(self, items: list[Item]) -> Iterator[list[Item]]:
        """Keeps each request under the message size limit; an image over it alone fails here."""
        budget = self.connection.max_message_bytes - _MESSAGE_OVERHEAD
        current: list[Item] = []
        size = 0
        for item in items:
            if len(item.data) > budget:
                message = f"image is {len(item.data)} bytes, over the {budget}-byte message budget"
                item = Item(item.index, item.id, error=ItemError(_INVALID_ARGUMENT, message))
            if current and size + len(item.data) > budget:
                yield current
                current, size = [], 0
            current.append(item)
            size += len(item.data)
        if current:
            yield current


Images = Iterable[Any] | AsyncIterable[Any]


def _paired(images: Images, ids: Sequence[str] | None) -> Images:
    """The images as `(id, image)` pairs when `ids` are given apart from them."""
    if ids is None:
        return images
    if isinstance(images, AsyncIterable):
        raise TypeError("ids go with a list of images; an async iterable yields (id, image) pairs instead")
    return list(zip(ids, images, strict=True))


def _take_and_encode(iterator: Iterator[Any], count: int, start: int) -> list[Item]:
    return encode_many(take(iterator, count), start)


def _timeout_ms(timeout: float | None) -> int:
    """A request's `timeout_ms` (0: none), at least 1 ms."""
    return 0 if timeout is None else max(1, round(1000 * timeout))


def answer_within(timeout: float | None) -> float | None:
    """How long the oldest request of a stream may wait for its answer: the server answers within
    `timeout` of receiving it; the rest is room for the wire (a stuck server breaks the stream)."""
    return None if timeout is None else timeout + max(_WIRE_S, 0.1 * timeout)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return value
