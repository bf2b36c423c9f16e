"""Turns what callers hold (paths, bytes, PIL images, numpy arrays) into encoded image bytes.

The service takes encoded files, so paths and bytes travel as they are, and
in-memory pixels are encoded losslessly as PNG (a JPEG round trip would change
the embedding). A file that cannot be read becomes a per-item error, like a
file the server cannot decode, so one bad path does not stop a job.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from client.errors import ItemError

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""One image: a file path, encoded file bytes, a PIL image, or a uint8/uint16 array (HxW, HxWx3, HxWx4)."""

# google.rpc.Code numbers for failures found on the client.
_NOT_FOUND, _PERMISSION_DENIED, _INVALID_ARGUMENT, _UNKNOWN = 5, 7, 3, 2


@dataclass(frozen=True)
class Item:
    """One input ready to send: its position, its id, and its bytes or the reason it has none."""

    index: int
    id: str
    data: bytes = b""
    error: ItemError | None = None


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Encodes pixels as PNG, which keeps every value (the service converts to grayscale itself)."""
    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.dtype == np.bool_:
        return Image.fromarray(array)
    if array.ndim == 2 and array.dtype in (np.uint8, np.uint16):
        return Image.fromarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array))
    raise TypeError(
        f"cannot encode an array of shape {array.shape} and dtype {array.dtype} as an image: "
        "pass uint8 HxW, HxWx3 or HxWx4 (or uint16 HxW) pixels"
    )


def default_id(image: Any, index: int) -> str:
    """A path's id is the path as given; anything else is its input position."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return str(index)


def encode(index: int, image: ImageInput, image_id: str | None = None) -> Item:
    """Reads or encodes one input. Unreadable files become the item's error (as does an `ItemError` given
    in place of an image); wrong types raise TypeError."""
    image_id = default_id(image, index) if image_id is None else image_id
    if isinstance(image, ItemError):  # an input already known to fail (found so while listing inputs)
        return Item(index, image_id, error=image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return Item(index, image_id, bytes(image))
    if isinstance(image, (Image.Image, np.ndarray)):
        return Item(index, image_id, png_bytes(image))
    if isinstance(image, (str, os.PathLike)):
        try:
            return Item(index, image_id, Path(image).read_bytes())
        except FileNotFoundError:
            return Item(index, image_id, error=ItemError(_NOT_FOUND, f"no such file: {os.fspath(image)}"))
        except PermissionError:
            return Item(index, image_id, error=ItemError(_PERMISSION_DENIED, f"permission denied: {os.fspath(image)}"))
        except IsADirectoryError:
            return Item(index, image_id, error=ItemError(_INVALID_ARGUMENT, f"is a directory: {os.fspath(image)}"))
        except OSError as exc:
            return Item(index, image_id, error=ItemError(_UNKNOWN, f"cannot read {os.fspath(image)}: {exc.strerror}"))
    raise TypeError(f"input #{index} is a {type(image).__name__}; expected a path, bytes, a PIL image or an array")


def split_id(element: Any) -> tuple[str | None, Any]:
    """`(id, image)` pairs carry their own id; a bare image gets the default one."""
    if isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], str):
        return element[0], element[1]
    return None, element


def encode_many(elements: Iterable[Any], start: int) -> list[Item]:
    """Encodes a run of inputs (bare images or `(id, image)` pairs) numbered from `start`."""
    items = []
    for offset, element in enumerate(elements):
        image_id, image = split_id(element)
        items.append(encode(start + offset, image, image_id))
    return items


def take(iterator: Iterator[Any], count: int) -> list[Any]:
    """Up to `count` next elements of an iterator (fewer at its end)."""
    out = []
    for element in iterator:
        out.append(element)
        if len(out) == count:
            break
    return out
