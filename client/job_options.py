"""What a dataset job is asked to do, and what each image adds to its output: a row of OUT.

A row is a pooled embedding, float32 [D], or, in a patch token job, the
image's tokens [rows, cols, D] in the dtype asked for (client/output.py `Layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.backends import TokenAsk
from client.errors import EmbedClientError, ItemResult
from client.manifest import Identity
from client.output import TOKEN_SUFFIXES, Layout, tokens_refused
from client.sources import Inputs


class JobError(EmbedClientError):
    """The job must stop: the service answered something the job's rows cannot take."""


@dataclass(frozen=True)
class JobOptions:
    """What `python -m client embed` was asked to do."""

    inputs: Inputs
    out: Path | None
    pooling: str = "cls"
    normalize: bool = False
    resume: bool = False
    overwrite: bool = False
    retry_failed: bool = False
    shard_rows: int = 1024
    shard_seconds: float = 10.0
    progress: str = "off"
    log_every_s: float = 10.0
    tokens: TokenAsk | None = None

    def __post_init__(self) -> None:
        """Refuses patch tokens where the output cannot hold them, before anything is sent."""
        if self.tokens is not None and (self.out is None or self.out.suffix.lower() not in TOKEN_SUFFIXES):
            raise ValueError(tokens_refused(self.out))


def layout(identity: Identity) -> Layout:
    """What one row of a job with this identity holds."""
    if identity.patch_tokens:
        return Layout((identity.token_rows, identity.token_cols, identity.dim), identity.patch_tokens)
    return Layout((identity.dim,))


def row_of(result: ItemResult, tokens: TokenAsk | None) -> np.ndarray:
    """What a successful image adds to OUT: its embedding, or in a patch token job its tokens."""
    if tokens is None:
        return result.embedding  # type: ignore[return-value]
    if result.patch_tokens is None:
        raise JobError(f"the server answered no patch tokens for {result.id!r}: is it older than patch tokens? "
                       "update it, or embed without --patch-tokens")  # fmt: skip
    return result.patch_tokens


def sizes(shape: tuple[int, ...]) -> str:
    """`384`, `16x16x384`: a row's shape in messages."""
    return "x".join(map(str, shape))
