"""Where a dataset job's images are embedded: gRPC servers or a RunPod endpoint, behind one interface.

A backend says what it runs (`identity`, for the job's manifest) and turns a
stream of `(id, image)` pairs into lists of `ItemResult`s in input order, with
a bounded number of requests in flight and retries for refused requests. A job
that asks for patch tokens (`TokenAsk`) gets them on each `ItemResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from client.async_client import POOLINGS
from client.connection import Retrying, RetryPolicy
from client.errors import ItemResult, UsageError
from client.manifest import Identity
from client.runpod_client import DEFAULT_BASE_URL, RunPodClient
from client.sync_client import EmbedClient
from client.tokens import token_bytes
from client.window import WindowListener

DEFAULT_BATCH_SIZE = 32
DEFAULT_WINDOW = 8
TOKEN_BYTES_IN_FLIGHT = 512 * 2**20
"""Patch tokens of the requests a job keeps in flight, at most (unless --window says otherwise)."""

WRITABLE_TOKEN_DTYPES = ("float32", "float16")
RUNPOD_NO_TOKENS = "--patch-tokens needs gRPC servers (--server): a RunPod endpoint does not send patch tokens yet"


@dataclass(frozen=True)
class TokenAsk:
    """A job that writes each image's patch tokens, in `dtype`, instead of its pooled embedding.

    bfloat16 is refused: NumPy and Parquet have no such type, and widened to float32 it would
    take float32's disk for bfloat16's precision.
    """

    dtype: str
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.dtype == "bfloat16":
            raise ValueError("--patch-tokens bfloat16 cannot be written: NumPy and Parquet have no bfloat16 type; "
                             "give float16 (as small) or float32")  # fmt: skip
        if self.dtype not in WRITABLE_TOKEN_DTYPES:
            raise ValueError(f"--patch-tokens takes {' or '.join(WRITABLE_TOKEN_DTYPES)}, not {self.dtype!r}")


class Backend(Protocol):
    def identity(self, pooling: str, normalize: bool, tokens: TokenAsk | None = None) -> Identity: ...
    def embed_batches(self, pairs: Iterable[tuple[str, Any]], pooling: str, normalize: bool,
                      tokens: TokenAsk | None = None) -> Iterator[list[ItemResult]]: ...  # fmt: skip
    def close(self) -> None: ...


def row_size(embedding_dim: int, pooling: str) -> int:
    """Values per row: the model's size, twice it for cls_mean."""
    return embedding_dim * (2 if pooling == "cls_mean" else 1)


class GrpcBackend:
    """One or several `python -m server` addresses (round-robin), through `EmbedClient`.

    `batch_size` None: 32, or the server's `max_images_per_request` when that is smaller.
    `window` None: 8, fewer when that many requests would hold over `TOKEN_BYTES_IN_FLIGHT`
    of patch tokens.
    """

    def __init__(
        self,
        targets: list[str],
        *,
        batch_size: int | None,
        window: int | None,
        timeout: float,
        retry_for_s: float,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: Path | None = None,
        on_retry: Callable[[Retrying], None] | None = None,
        on_window: WindowListener | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.window = window
        self.client = EmbedClient(
            targets, timeout=timeout, batch_size=batch_size or DEFAULT_BATCH_SIZE, window=window or DEFAULT_WINDOW,
            tls=tls, tls_ca=tls_ca, api_key=api_key,
            retry=RetryPolicy(retry_for_s=retry_for_s, on_retry=on_retry, on_window=on_window),
        )  # fmt: skip

    def identity(self, pooling: str, normalize: bool, tokens: TokenAsk | None = None) -> Identity:
        """What the server runs; refuses (`UsageError`) a --batch-size it would refuse every request of,
        and patch tokens from a server that does not say its patch size (it predates them)."""
        info = self.client.info()
        most = info.max_images_per_request
        if self.batch_size is not None and self.batch_size > most > 0:
            raise UsageError(f"--batch-size {self.batch_size} is over the server's limit of {most} images per "
                             f"request: give --batch-size {most} or less")  # fmt: skip
        if self.batch_size is None and most > 0:
            self.batch_size = min(DEFAULT_BATCH_SIZE, most)
        identity = Identity(
            model_id=info.model_id, revision=info.revision, dtype=info.dtype, embedding_dim=info.embedding_dim,
            pooling=pooling, normalize=normalize, dim=row_size(info.embedding_dim, pooling),
            image_size=info.image_size, preprocess=info.preprocess,
        )  # fmt: skip
        if tokens is None:
            return identity
        if info.patch_size <= 0 or info.image_size <= 0:
            raise UsageError("the server does not say its image and patch size: it is older than patch tokens; "
                             "update it, or embed without --patch-tokens")  # fmt: skip
        if self.window is None:
            request = min((self.batch_size or DEFAULT_BATCH_SIZE) * token_bytes(info, tokens.dtype),
                          self.client.connection.max_message_bytes)  # fmt: skip
            self.window = max(1, min(DEFAULT_WINDOW, TOKEN_BYTES_IN_FLIGHT // request))
        side = info.image_size // info.patch_size
        return replace(identity, dim=info.embedding_dim, patch_tokens=tokens.dtype,
                       normalize_tokens=tokens.normalize, token_rows=side, token_cols=side)  # fmt: skip

    def embed_batches(self, pairs: Iterable[tuple[str, Any]], pooling: str, normalize: bool,
                      tokens: TokenAsk | None = None) -> Iterator[list[ItemResult]]:  # fmt: skip
        return self.client.embed_batches(
            pairs, pooling=pooling, normalize=normalize, batch_size=self.batch_size, window=self.window,
            patch_tokens=tokens.dtype if tokens else None, normalize_tokens=bool(tokens and tokens.normalize),
        )  # fmt: skip

    def close(self) -> None:
        self.client.close()


class RunPodBackend:
    """A RunPod serverless endpoint running `runpod_handler.py` (or the local API server at `base_url`).

    RunPod has no `Info`: the job's identity is the endpoint itself, and the row
    size is learned from the first embedding.
    """

    def __init__(
        self,
        endpoint_id: str | None,
        api_key: str | None,
        *,
        base_url: str = DEFAULT_BASE_URL,
        batch_size: int,
        window: int,
        timeout: float,
        retry_for_s: float,
        on_retry: Callable[[Retrying], None] | None = None,
        on_window: WindowListener | None = None,
    ) -> None:
        self.where = f"runpod:{endpoint_id}" if endpoint_id else f"runpod:{base_url}"
        self.client = RunPodClient(
            endpoint_id, api_key, base_url=base_url, timeout=timeout, batch_size=batch_size, window=window,
            retry=RetryPolicy(retry_for_s=retry_for_s, on_retry=on_retry, on_window=on_window),
        )  # fmt: skip

    def identity(self, pooling: str, normalize: bool, tokens: TokenAsk | None = None) -> Identity:
        if tokens is not None:
            raise UsageError(RUNPOD_NO_TOKENS)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        return Identity(self.where, "", "", 0, pooling, normalize, 0)

    def embed_batches(self, pairs: Iterable[tuple[str, Any]], pooling: str, normalize: bool,
                      tokens: TokenAsk | None = None) -> Iterator[list[ItemResult]]:  # fmt: skip
        if tokens is not None:
            raise UsageError(RUNPOD_NO_TOKENS)
        return self.client.embed_batches(pairs, pooling=pooling, normalize=normalize)

    def close(self) -> None:
        self.client.close()
