"""Patch tokens on the client side: asking for them, reading them off the wire, stacking them.

The server sends each image's patch tokens as little-endian bytes in the
dtype asked for. They come back as NumPy arrays [rows, cols, dim]: float32,
or float16 as sent; bfloat16, which NumPy has no type for, is widened to
float32 (exactly: a bfloat16 is the top half of a float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pybase64

from client.errors import EmbedItemsError, ItemResult
from protos.dinov2.v1 import embed_pb2

TOKEN_DTYPES = {
    "float32": embed_pb2.TOKEN_DTYPE_FLOAT32,
    "float16": embed_pb2.TOKEN_DTYPE_FLOAT16,
    "bfloat16": embed_pb2.TOKEN_DTYPE_BFLOAT16,
}
"""The patch token dtypes a caller can ask for, by name."""

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_NAMES = {number: name for name, number in TOKEN_DTYPES.items()} | {embed_pb2.TOKEN_DTYPE_UNSPECIFIED: "float32"}


def token_options(dtype: str, normalize: bool) -> embed_pb2.PatchTokensOptions:
    """A request's ask for patch tokens of `dtype`; `ValueError` names the choices."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"patch token dtype must be one of {', '.join(TOKEN_DTYPES)}, not {dtype!r}")
    return embed_pb2.PatchTokensOptions(enabled=True, dtype=TOKEN_DTYPES[dtype], normalize=normalize)


def token_bytes(info: embed_pb2.InfoResponse, dtype: str) -> int:
    """Bytes of one image's patch tokens from a server that answered `info`."""
    side = info.image_size // max(1, info.patch_size)
    return side * side * info.embedding_dim * _ITEMSIZE[dtype]


def from_wire(tokens: embed_pb2.PatchTokens) -> np.ndarray:
    """One image's tokens as [rows, cols, dim] (float32 and float16: a read-only view of the message's
    bytes); `ValueError` when the bytes do not match the shape."""
    name = _NAMES.get(tokens.dtype)
    if name is None:
        raise ValueError(f"unknown patch token dtype {tokens.dtype}")
    count = tokens.rows * tokens.cols * tokens.dim
    if len(tokens.data) != count * _ITEMSIZE[name]:
        raise ValueError(f"patch tokens of {tokens.rows}x{tokens.cols}x{tokens.dim} {name} cannot be "
                         f"{len(tokens.data)} bytes")  # fmt: skip
    if name == "bfloat16":
        values = (np.frombuffer(tokens.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(tokens.data, dtype="<f4" if name == "float32" else "<f2")
    return values.reshape(tokens.rows, tokens.cols, tokens.dim)


def from_json(entry: dict[str, Any]) -> np.ndarray:
    """One image's tokens from the JSON job shape (`{"rows", "cols", "dim", "dtype", "data": base64}`)."""
    dtype = TOKEN_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"unknown patch token dtype {entry['dtype']!r}")
    message = embed_pb2.PatchTokens(rows=int(entry["rows"]), cols=int(entry["cols"]), dim=int(entry["dim"]),
                                    dtype=dtype, data=pybase64.b64decode(entry["data"], validate=True))  # fmt: skip
    return from_wire(message)


def stack_tokens(results: list[ItemResult], empty_shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """Results' tokens as one [N, rows, cols, dim] array; raises `EmbedItemsError` (NaN at failures) if any failed.

    `empty_shape` and `dtype` are what an array without any success has.
    """
    first = next((r.patch_tokens for r in results if r.patch_tokens is not None), None)
    shape = first.shape if first is not None else empty_shape
    array = np.full((len(results), *shape), np.nan, dtype=first.dtype if first is not None else dtype)
    for row, result in enumerate(results):
        if result.patch_tokens is not None:
            array[row] = result.patch_tokens
    if any(not r.ok for r in results):
        raise EmbedItemsError(results, array)
    return array


def host_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype tokens asked for in `dtype` arrive as."""
    return np.dtype(np.float16 if dtype == "float16" else np.float32)
