"""`EmbedClient`: the blocking twin of `AsyncEmbedClient`, for scripts and notebooks.

It owns a private event loop on a daemon thread and runs an `AsyncEmbedClient`
there, so both clients share one implementation of batching, streaming,
retries and ordering. Results cross threads one request at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from client.async_client import AsyncEmbedClient
from client.connection import DEFAULT_MAX_MESSAGE_BYTES, ConnectionOptions, RetryPolicy
from client.errors import ItemResult
from protos.dinov2.v1 import embed_pb2

T = TypeVar("T")


class EmbedClient:
    """Embeds images with a DINOv2 embedding service (blocking calls).

    Takes the same arguments as `AsyncEmbedClient`. Use as a context manager
    (`with EmbedClient("localhost:50051") as client:`) or call `close()`. Threads may share
    one client: each call is its own job on the client's event loop.
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
        self._async = AsyncEmbedClient(
            target, timeout=timeout, batch_size=batch_size, window=window, tls=tls, tls_ca=tls_ca,
            api_key=api_key, max_message_bytes=max_message_bytes, retry=retry, channel_options=channel_options,
        )  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embed-client", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def connection(self) -> ConnectionOptions:
        return self._async.connection

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channels and stops the client's event loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._async.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def info(self, timeout: float | None = None) -> embed_pb2.InfoResponse:
        """What the (next) server runs: model, embedding size, dtype, device and limits."""
        return self._call(self._async.info(timeout))

    def embed(
        self,
        images: Iterable[Any],
        *,
        ids: Sequence[str] | None = None,
        pooling: str | int = "cls",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Embeds every image; returns float32 [N, D] in input order.

        Raises `EmbedItemsError` if any image failed (names them, holds the
        other rows), `EmbedRequestError` if a request failed after retries.
        """
        return self._call(
            self._async.embed(
                images, ids=ids, pooling=pooling, normalize=normalize, batch_size=batch_size, window=window,
                timeout=timeout,
            )
        )  # fmt: skip

    def patch_tokens(
        self,
        images: Iterable[Any],
        *,
        ids: Sequence[str] | None = None,
        dtype: str = "float16",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Every image's patch tokens, [N, rows, cols, dim] in input order (see `AsyncEmbedClient.patch_tokens`)."""
        return self._call(
            self._async.patch_tokens(
                images, ids=ids, dtype=dtype, normalize=normalize, batch_size=batch_size, window=window,
                timeout=timeout,
            )
        )  # fmt: skip

    def embed_iter(
        self,
        images: Iterable[Any],
        *,
        pooling: str | int = "cls",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
        patch_tokens: str | None = None,
        normalize_tokens: bool = False,
    ) -> Iterator[ItemResult]:
        """Streams `ItemResult`s in input order; failed images carry `error` (see `AsyncEmbedClient.embed_iter`)."""
        for batch in self.embed_batches(
            images, pooling=pooling, normalize=normalize, batch_size=batch_size, window=window, timeout=timeout,
            patch_tokens=patch_tokens, normalize_tokens=normalize_tokens,
        ):  # fmt: skip
            yield from batch

    def embed_batches(
        self,
        images: Iterable[Any],
        *,
        pooling: str | int = "cls",
        normalize: bool = False,
        batch_size: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
        patch_tokens: str | None = None,
        normalize_tokens: bool = False,
    ) -> Iterator[list[ItemResult]]:
        """`embed_iter`, one list per request."""
        batches = self._async.embed_batches(
            images, pooling=pooling, normalize=normalize, batch_size=batch_size, window=window, timeout=timeout,
            patch_tokens=patch_tokens, normalize_tokens=normalize_tokens,
        )  # fmt: skip
        current = _Current()
        try:
            while True:
                try:
                    yield self._call(current.next(batches))
                except StopAsyncIteration:
                    return
        finally:
            # Also when this thread was interrupted (Ctrl-C) while the loop was still
            # working on the next batch: stop that first, then close the generator.
            if not self._closed:
                self._call(current.cancel_and_close(batches))


class _Current:
    """The task that runs an async generator's `__anext__` for the caller's thread, so it can be cancelled."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None

    async def next(self, iterator: Any) -> Any:
        self.task = asyncio.current_task()
        try:
            return await iterator.__anext__()
        finally:
            self.task = None

    async def cancel_and_close(self, iterator: Any) -> None:
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await iterator.aclose()
