"""Patch tokens as an output: what a caller asks for, and what one image's tokens are.

DINOv2's patch tokens (the last hidden state without the CLS and register
tokens) are its dense features. They are large: 256 tokens of the model's
width per image at 224, 1024 at 448. A caller picks their number type:
float32 (as computed), or float16/bfloat16 at half the size, cast on the
model's device so that only the half-size copy crosses to the host. The
bytes are little-endian, as every transport sends them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TOKEN_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The number types patch tokens can be sent in, by name."""

_HOST_VIEW: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # NumPy has no bfloat16: its bits
}


@dataclass(frozen=True)
class TokenOptions:
    """A request's ask for patch tokens: their number type, and whether each is L2-normalized first."""

    dtype: str = "float32"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"patch token dtype must be one of {', '.join(TOKEN_DTYPES)}, not {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return _HOST_VIEW[self.dtype].itemsize


@dataclass(frozen=True)
class PatchTokens:
    """One image's patch tokens: a [rows * cols, dim] array in row-major patch order.

    `values` has NumPy dtype `<f4` or `<f2`, or `<u2` holding bfloat16 bits;
    `data` is its bytes as sent on the wire.
    """

    rows: int
    cols: int
    dtype: str
    values: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.values.shape[-1])

    @property
    def data(self) -> bytes:
        return self.values.tobytes()

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


def to_host(tokens: torch.Tensor, options: TokenOptions) -> np.ndarray:
    """[B, N, D] tokens on the model's device -> normalized if asked, cast there, copied once to the host."""
    if options.normalize:
        tokens = torch.nn.functional.normalize(tokens.float(), dim=-1)
    cast = tokens.to(TOKEN_DTYPES[options.dtype])
    if options.dtype == "bfloat16":
        cast = cast.view(torch.int16)
    return cast.cpu().numpy().view(_HOST_VIEW[options.dtype])


def as_float32(tokens: PatchTokens) -> np.ndarray:
    """The tokens as float32 [rows, cols, dim] (bfloat16 widened exactly)."""
    values = tokens.values
    if tokens.dtype == "bfloat16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False).reshape(tokens.rows, tokens.cols, tokens.dim)
