"""What a decode worker process and its parent send each other: fixed binary frames, never pickle.

The child parses untrusted images; if one ever took it over, a pickle from it
would run code in the server. So the child's answers are frames the parent
reads with `struct` and `numpy.frombuffer` only, each bounded in size:

    frame   = kind (1 byte) | body length (uint64) | body
    READY body = empty (the child has started and waits for chunks)
    HOLD, RELEASE body = pixels (uint64)
    DONE body = count (uint32) | count x item | failures (uint32) | failures x (len uint32 | utf-8)
                | the pixels of every decoded item, in order, height x width bytes each
    item    = 0 (decoded), height (uint32), width (uint32)
              | 1, type name len (uint8), name, message len (uint32), message (utf-8)

A decoded item is image_size x image_size when the workers resize, and any
size up to the pixel limit when they hand back full-size pixels (`--resize-on
device`); the reader checks which it expects.

The pixels are read straight into one buffer and handed on as views of it, so
a chunk's pixels are copied once on this side (from the pipe).

The parent sends frames too, for speed rather than safety (pickling a chunk
of encoded images copied each of them twice more):

    CHUNK body = count (uint32) | count x length (uint64) | the images' bytes, in order
    GRANT, STOP body = empty (the budget a HOLD asked for is held; no more work)
"""

from __future__ import annotations

import itertools
import os
import select
import struct
import time
from collections.abc import Sequence

import numpy as np

from server import errors
from server.errors import EmbedError

Buffer = bytes | memoryview

READY, HOLD, RELEASE, DONE = b"Y", b"H", b"R", b"D"
CHUNK, GRANT, STOP = b"C", b"G", b"S"
FROM_CHILD, FROM_PARENT = (READY, HOLD, RELEASE, DONE), (CHUNK, GRANT, STOP)

_HEADER = struct.Struct("<cQ")
_U8, _U32, _U64 = struct.Struct("<B"), struct.Struct("<I"), struct.Struct("<Q")
_SHAPE = struct.Struct("<II")
_ERROR_TYPES = {
    cls.__name__: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, EmbedError)
}
_IOV_MAX = 1024  # the most buffers one writev takes on Linux
_MESSAGE_BYTES = 4096  # an error message is cut to this
_FAILURE_BYTES = 16384  # a failure's traceback text is cut to this


class WireError(Exception):
    """The other side closed the pipe, or sent what this format does not allow."""


class Overdue(Exception):
    """No whole frame came before the reader's deadline."""


def write_frame(fd: int, kind: bytes, *body: Buffer, deadline: float | None = None) -> None:
    """Writes one frame whose body is the `body` parts one after the other (not joined first).

    With a `deadline`, `fd` must be non-blocking: `Overdue` if the reader has not made room by then.
    """
    views = [memoryview(part).cast("B") for part in body]  # flat: len() counts bytes, whatever the shape
    parts = [memoryview(_HEADER.pack(kind, sum(map(len, views)))), *views]
    while parts:
        if deadline is not None:
            _wait_for(fd, select.POLLOUT, deadline)
        try:
            written = os.writev(fd, parts[:_IOV_MAX])
        except BlockingIOError:
            continue
        while parts and written >= len(parts[0]):
            written -= len(parts.pop(0))
        if written:
            parts[0] = parts[0][written:]


def read_frame(
    fd: int, max_body: int, kinds: Sequence[bytes] = FROM_CHILD, deadline: float | None = None
) -> tuple[bytes, bytearray]:
    """The next frame's kind and body; `WireError` at end of file, for a kind not in `kinds`,
    or for a body over `max_body`; `Overdue` if it is not all here by `deadline` (`time.monotonic()`)."""
    kind, size = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    if kind not in kinds or size > max_body:
        raise WireError(f"unexpected frame {kind!r} of {size} bytes")
    return kind, _read_exact(fd, size, deadline)


def encode_count(pixels: int) -> bytes:
    return _U64.pack(pixels)


def decode_count(body: bytearray) -> int:
    if len(body) != _U64.size:
        raise WireError("a count of the wrong size")
    return _U64.unpack(body)[0]


def encode_chunk(images: Sequence[bytes]) -> list[Buffer]:
    """A CHUNK body, as parts for `write_frame`: the images themselves are not copied."""
    return [_U32.pack(len(images)) + struct.pack(f"<{len(images)}Q", *map(len, images)), *images]


def decode_chunk(body: bytearray) -> list[bytes]:
    """The images of a CHUNK body (from the parent, which is trusted: a bad one is a bug)."""
    view = memoryview(body)
    try:
        (count,) = _U32.unpack_from(view)
        lengths = struct.unpack_from(f"<{count}Q", view, _U32.size)
    except struct.error as exc:
        raise WireError(f"malformed chunk: {exc}") from None
    images, at = [], _U32.size + 8 * count
    for length in lengths:
        images.append(bytes(view[at : at + length]))
        at += length
    if at != len(view):
        raise WireError(f"a chunk of {len(view)} bytes holds {at}")
    return images


def encode_results(results: Sequence[np.ndarray | EmbedError], failures: Sequence[str]) -> list[Buffer]:
    """A DONE body, as parts for `write_frame`: each result (pixels or error) in order, and the
    failures' texts for the log; the pixels themselves are not copied."""
    parts = [_U32.pack(len(results))]
    pixels = []
    for result in results:
        if isinstance(result, EmbedError):
            name = type(result).__name__.encode()
            message = _cut(str(result), _MESSAGE_BYTES)
            parts += [_U8.pack(1), _U8.pack(len(name)), name, _U32.pack(len(message)), message]
        else:
            image = np.ascontiguousarray(result, dtype=np.uint8)
            parts += [_U8.pack(0), _SHAPE.pack(*image.shape)]
            pixels.append(image.data)
    parts.append(_U32.pack(len(failures)))
    for failure in failures:
        text = _cut(failure, _FAILURE_BYTES)
        parts += [_U32.pack(len(text)), text]
    return [b"".join(parts), *pixels]


def max_results_body(count: int, image_pixels: int) -> int:
    """The largest DONE body that `count` results of at most `image_pixels` each and their failures can make."""
    per_item = 1 + 1 + 255 + 4 + _MESSAGE_BYTES + 4 + _FAILURE_BYTES
    return 8 + count * (image_pixels + per_item)


def decode_results(
    body: bytearray, count: int, image_size: int | None
) -> tuple[list[np.ndarray | EmbedError], list[str]]:
    """The results of a DONE body that answers a chunk of `count` images; `WireError` if malformed.

    Each image must be image_size x image_size, or of any size when `image_size` is None (full size).
    """
    try:
        return _decode_results(memoryview(body), count, image_size)
    except (struct.error, UnicodeDecodeError, ValueError, KeyError) as exc:
        raise WireError(f"malformed results: {exc}") from None


def _decode_results(
    view: memoryview, count: int, image_size: int | None
) -> tuple[list[np.ndarray | EmbedError], list[str]]:
    (n,), at = _U32.unpack_from(view), _U32.size
    if n != count:
        raise ValueError(f"{n} results for {count} images")
    results: list[np.ndarray | EmbedError | tuple[int, int]] = []
    for _ in range(n):
        (tag,), at = _U8.unpack_from(view, at), at + 1
        if tag == 0:
            shape, at = _SHAPE.unpack_from(view, at), at + _SHAPE.size
            if min(shape) < 1 or (image_size is not None and shape != (image_size, image_size)):
                raise ValueError(f"an image of {shape[0]}x{shape[1]} pixels")
            results.append(shape)
            continue
        if tag != 1:  # else an error record after it would be read as this item's
            raise ValueError(f"an item tagged {tag}")
        (name_len,), at = _U8.unpack_from(view, at), at + 1
        name, at = bytes(view[at : at + name_len]).decode(), at + name_len
        (message_len,), at = _U32.unpack_from(view, at), at + _U32.size
        message, at = bytes(view[at : at + message_len]).decode(), at + message_len
        results.append(_ERROR_TYPES[name](message))
    (failure_count,), at = _U32.unpack_from(view, at), at + _U32.size
    failures = []
    for _ in range(failure_count):
        (length,), at = _U32.unpack_from(view, at), at + _U32.size
        failures.append(bytes(view[at : at + length]).decode(errors="replace"))
        at += length
    shapes = [result for result in results if isinstance(result, tuple)]
    sizes = [height * width for height, width in shapes]
    if len(view) - at != sum(sizes):
        raise ValueError(f"{len(view) - at} bytes of pixels for {len(shapes)} images of {sum(sizes)}")
    decoded = iter(
        np.frombuffer(view.obj, dtype=np.uint8, count=size, offset=offset).reshape(shape)
        for shape, size, offset in zip(shapes, sizes, itertools.accumulate(sizes, initial=at), strict=False)
    )
    return [next(decoded) if isinstance(result, tuple) else result for result in results], failures  # type: ignore[misc]


def _cut(text: str, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8, never half a character (the reader decodes strictly)."""
    return text.encode()[:limit].decode(errors="ignore").encode()


def _read_exact(fd: int, size: int, deadline: float | None = None) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        if deadline is not None:
            _wait_for(fd, select.POLLIN, deadline)
        read = os.readv(fd, [view[got:]])
        if read == 0:
            raise WireError("the worker closed its pipe")
        got += read
    return buffer


def _wait_for(fd: int, event: int, deadline: float) -> None:
    """Returns once `fd` is ready for `event` (or closed at the other end); `Overdue` at `deadline`."""
    poller = select.poll()
    poller.register(fd, event)
    while not poller.poll(max(0, int((deadline - time.monotonic()) * 1000) + 1)):
        if time.monotonic() >= deadline:
            raise Overdue("the other side did not answer by the deadline")
