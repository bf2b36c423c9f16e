"""What the client reports when something fails, and the data that goes with it.

Two levels, as in the service's contract:

- one image failed (not an image, too large, its batch's forward pass failed):
  an `ItemError` on that image's `ItemResult`; `embed()` collects them into an
  `EmbedItemsError` that also carries every result that did succeed;
- a whole request failed after the retries the client is allowed (server
  unreachable, overloaded for too long, refused, deadline passed):
  `EmbedRequestError`, raised; nothing of that request is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

_CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}


def code_name(code: int) -> str:
    """The google.rpc.Code name of a number (`3` -> `INVALID_ARGUMENT`)."""
    return _CODE_NAMES.get(code, f"CODE_{code}")


@dataclass(frozen=True)
class ItemError:
    """Why one image has no embedding: a google.rpc.Code number and the server's (or client's) message."""

    code: int
    message: str

    @property
    def code_name(self) -> str:
        return code_name(self.code)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}"


@dataclass(frozen=True)
class ItemResult:
    """One input's answer, at its input position: an embedding or an error, never both; with its
    patch tokens [rows, cols, dim] when they were asked for (client/tokens.py)."""

    index: int
    id: str
    embedding: np.ndarray | None = None
    error: ItemError | None = None
    patch_tokens: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class EmbedClientError(Exception):
    """Base of the errors this client raises."""


class EmbedRequestError(EmbedClientError):
    """A whole request was refused or failed, after any retries.

    `code` is the google.rpc.Code number (14 UNAVAILABLE when no server could
    be reached, 8 RESOURCE_EXHAUSTED when every try found the server full,
    4 DEADLINE_EXCEEDED when `timeout` passed); `ids` are the images of that request.
    """

    def __init__(self, code: int, message: str, ids: tuple[str, ...] = (), attempts: int = 1) -> None:
        self.code = code
        self.message = message
        self.ids = ids
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        what = f"request of {len(ids)} image(s)" if ids else "call"
        super().__init__(f"{what} failed{tries}: {code_name(code)}: {message}")

    @property
    def code_name(self) -> str:
        return code_name(self.code)


class EmbedItemsError(EmbedClientError):
    """Some images of an `embed()` call failed; the others succeeded.

    `failures` are the failed items (index, id, error) in input order;
    `results` all items in input order; `embeddings` is the [N, D] float32
    array with NaN rows at the failed positions (D is 0 when nothing
    succeeded) and `ok` the boolean mask of the rows that hold an embedding.
    """

    def __init__(self, results: list[ItemResult], embeddings: np.ndarray) -> None:
        self.results = results
        self.embeddings = embeddings
        self.failures = [r for r in results if r.error is not None]
        self.ok = np.array([r.ok for r in results], dtype=bool)
        shown = "; ".join(f"#{r.index} {r.id!r}: {r.error}" for r in self.failures[:5])
        more = f"; and {len(self.failures) - 5} more" if len(self.failures) > 5 else ""
        super().__init__(f"{len(self.failures)} of {len(results)} image(s) failed: {shown}{more}")


def over_message_limit(message: str) -> bool:
    """Whether gRPC refused a message for its size (`Received message larger than max`): the same
    request would be refused again."""
    return "larger than max" in message


class UsageError(ValueError):
    """The job cannot start as asked (exit status 2)."""


_FIXES: dict[int, str] = {
    grpc.StatusCode.UNAUTHENTICATED.value[0]: "give the server's API key (--api-key)",
    grpc.StatusCode.PERMISSION_DENIED.value[0]: "give the server's API key (--api-key)",
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: "change what the message names first",
    grpc.StatusCode.DEADLINE_EXCEEDED.value[0]: "raise --timeout (the server answered nothing within it)",
    grpc.StatusCode.UNIMPLEMENTED.value[0]: "point --server at a DINOv2 embedding server",
    grpc.StatusCode.FAILED_PRECONDITION.value[0]: "change what the message names first",
    grpc.StatusCode.OUT_OF_RANGE.value[0]: "change what the message names first",
}


def fix_before_rerun(exc: BaseException) -> str | None:
    """What must change before the same job, run again, gets further; None when running it again can
    (the server was away or busy, or failed on its side)."""
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        return "change what the message names first"
    if over_message_limit(str(exc)):  # it would be again
        return "send smaller requests (a lower --batch-size)"
    return _FIXES.get(code)
