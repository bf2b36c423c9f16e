"""Request bodies: read in a receive slot at a bounded pace, and parsed before the slot is given back.

A body is read only once a receive slot is free (server/receive_slots.py,
shared with gRPC's `Embed`: `max_receiving_requests` in all,
`max_receiving_per_caller` for one caller); a caller waits for one at most
`max_queue_s` (429 after). Until then the body waits unread in the socket's
buffers, and a caller that sent `Expect: 100-continue` is not told to send
it: its key and its declared size are checked first. A body must arrive
within `receive_timeout_s`, and after `receive_grace_s` no slower than
`min_receive_rate` bytes per second since its read began, or it is cut (408)
and its slot freed. It may not pass `max_request_bytes` (a declared
Content-Length over it is refused before a byte is read). It is parsed in the
same slot, off the event loop, so that the bodies in memory, raw or parsed,
are bounded by the slots. Compressed bodies are refused, as gRPC refuses
compressed messages: a small gzip body would inflate to the whole limit.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from server import errors
from server.callers import CALLER
from server.http.status import HttpError
from server.json_jobs import shown
from server.receive_slots import ReceiveSlots

T = TypeVar("T")

_FIELD_BYTES = 1024  # an option field's value (pooling, normalize, timeout_ms) is a word
_CHUNK_BYTES = 256 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_DISPOSITION_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass(frozen=True)
class Part:
    """One part of a multipart form: its name, whether it is a file (it has a file name) and its bytes."""

    name: str
    is_file: bool
    data: bytes


Body = bytearray | list[Part]
"""A body as read: its bytes, or a multipart body's parts."""


@dataclass(frozen=True)
class Pace:
    """How fast a body must arrive: all of it within `timeout_s`, and after `grace_s` at `min_rate` bytes/s."""

    timeout_s: float
    min_rate: int
    grace_s: float

    def due(self, started: float, arrived: int) -> float:
        """When more than `arrived` bytes must have come, for a read begun at `started` (`time.monotonic()`)."""
        return min(started + self.timeout_s, started + self.grace_s + arrived / self.min_rate)

    def refusal(self, started: float, arrived: int) -> HttpError:
        elapsed = time.monotonic() - started
        if elapsed >= self.timeout_s:
            said = f"did not arrive within {self.timeout_s:g} s (receive_timeout_s)"
        else:
            said = (f"arrived at {arrived / max(elapsed, 1e-9):.0f} bytes/s ({arrived} bytes in {elapsed:.1f} s), "
                    f"slower than {self.min_rate} bytes/s (min_receive_rate, after receive_grace_s)")  # fmt: skip
        return HttpError(408, "DEADLINE_EXCEEDED", f"the request body {said}: send it at once, or from nearer")


def too_large(limit: int) -> HttpError:
    return HttpError(
        413,
        "INVALID_ARGUMENT",
        f"request body is over the limit of {limit} bytes (max_request_bytes): send fewer or smaller images "
        "per request",
    )


class BodyReader:
    """Reads request bodies within the bounds, a bounded number at once, and parses them in their slot."""

    def __init__(
        self, max_bytes: int, slots: ReceiveSlots, pace: Pace, slot_wait_s: float, form_fields: tuple[str, ...],
        max_parts: int,
    ) -> None:  # fmt: skip
        """`slot_wait_s`: the longest wait for a receive slot; `form_fields`: the part names a form may use,
        at most `max_parts` parts."""
        self.max_bytes = max_bytes
        self._slots = slots
        self._pace = pace
        self._slot_wait_s = slot_wait_s
        self._form_fields = form_fields
        self._max_parts = max_parts
        self.on_body: Callable[[int], None] = lambda nbytes: None
        """Told each body's size once read, parsed or not (the engine's memory policy)."""

    def check_headers(self, request: web.Request) -> None:
        """Refuses, before any byte is read, a compressed body, one whose declared size is over the limit,
        or an expectation other than 100-continue."""
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise HttpError(
                415,
                "UNIMPLEMENTED",
                f"compressed request bodies are not accepted (Content-Encoding {shown(encoding)}): "
                "send the body uncompressed",
            )
        if request.content_length is not None and request.content_length > self.max_bytes:
            raise too_large(self.max_bytes)
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            raise HttpError(417, "INVALID_ARGUMENT", f"unknown expectation {shown(expect)}: only 100-continue is met")

    async def receive(self, request: web.Request, parse: Callable[[Body], T]) -> tuple[T, float]:
        """The body read in a receive slot at the pace, then `parse(body)` in a thread, in the same slot;
        and when it had arrived (`time.monotonic()`: a request's `timeout_ms` counts from then)."""
        self.check_headers(request)
        async with self._slots.slot(CALLER.get(), time.monotonic() + self._slot_wait_s):
            if request.headers.get("Expect") is not None and request.version >= (1, 1):
                await request.writer.write(_CONTINUE)
            started = time.monotonic()
            try:
                try:
                    body = await (self._parts(request, started) if request.content_type.startswith("multipart/")
                                  else self._bytes(request, started))  # fmt: skip
                except TimeoutError:
                    raise self._pace.refusal(started, request.content.total_bytes) from None
                arrived = time.monotonic()
                return await asyncio.to_thread(parse, body), arrived
            finally:
                self.on_body(request.content.total_bytes)

    def _due(self, request: web.Request, started: float) -> asyncio.Timeout:
        """The time limit of the next read: the pace's, from the bytes arrived so far."""
        due = self._pace.due(started, request.content.total_bytes)
        return asyncio.timeout(max(0.0, due - time.monotonic()))

    async def _bytes(self, request: web.Request, started: float) -> bytearray:
        body = bytearray()
        while True:
            async with self._due(request, started):
                chunk = await request.content.readany()
            if not chunk:
                return body
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large(self.max_bytes)

    async def _parts(self, request: web.Request, started: float) -> list[Part]:
        try:
            reader = await request.multipart()
        except (KeyError, ValueError, HttpProcessingError) as exc:  # no boundary parameter, or a bad one
            raise _malformed(exc) from None
        parts: list[Part] = []
        total = 0
        while True:
            try:
                async with self._due(request, started):
                    part = await reader.next()
            except (ValueError, HttpProcessingError) as exc:  # a bad boundary, too many or too long part headers
                raise _malformed(exc) from None
            if part is None:
                return parts
            if not isinstance(part, BodyPartReader):
                raise errors.InvalidRequest("nested multipart parts are not accepted: send each image as a file part")
            if len(parts) == self._max_parts:
                raise errors.InvalidRequest(
                    f"the form has more than {self._max_parts} parts: at most max_images_per_request images "
                    "and each option field once"
                )
            name, is_file = _disposition(part)
            if name not in self._form_fields:
                raise errors.InvalidRequest(
                    f"unknown form field {shown(name)}; accepted: {', '.join(self._form_fields)} "
                    "(curl -F image=@cat.jpg)"
                )
            is_image = name in ("image", "images")
            data = await self._read_part(request, started, part, self.max_bytes - total if is_image else _FIELD_BYTES)
            if data is None and is_image:
                raise too_large(self.max_bytes)
            if data is None:
                raise errors.InvalidRequest(f"form field {shown(name)} is over {_FIELD_BYTES} bytes: it takes a word")
            total += len(data)
            parts.append(Part(name, is_file, data))

    async def _read_part(self, request: web.Request, started: float, part: BodyPartReader, limit: int) -> bytes | None:
        """The part's bytes, or None as soon as they pass `limit`."""
        data = bytearray()
        while True:
            try:
                async with self._due(request, started):
                    chunk = await part.read_chunk(_CHUNK_BYTES)
            except (ValueError, HttpProcessingError) as exc:
                raise _malformed(exc) from None
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > limit:
                return None


def _malformed(exc: Exception) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"malformed multipart body ({str(exc)[:200]})")


def _disposition(part: BodyPartReader) -> tuple[str, bool]:
    """A form part's name, and whether it has a file name, from its Content-Disposition.

    Parsed here rather than by aiohttp's `part.name` and `part.filename`, which cost 0.08 ms each
    (they rebuild an escaped table of 128 characters on every call): 0.16 ms of the event loop per image.
    """
    header = part.headers.get("Content-Disposition", "")
    params = {key.lower(): value.strip() for key, value in _DISPOSITION_PARAM.findall(header)}
    name = params.get("name", "")
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1]
    return name, "filename" in params or "filename*" in params
