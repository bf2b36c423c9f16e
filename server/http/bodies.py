"""Request bodies: read within the server's bounds, then parsed; `POST /v1/embed`'s two forms.

A body is read only once a receive slot is free (`max_receiving_requests`,
shared with gRPC's `Embed`): until then it waits unread in the socket's
buffers, so N callers do not cost N bodies at once. Its read must end within
`receive_timeout_s`, and it may not pass `max_request_bytes` (a declared
Content-Length over it is refused before a byte is read). Compressed bodies
are refused, as gRPC refuses compressed messages: a small gzip body would
inflate to the whole limit before any check.

`/v1/embed` takes the JSON job (server/json_jobs.py, plus `timeout_ms`) or a
multipart form: file parts named `image` (one) or `images` (several), option
fields beside them, so that `curl -F image=@cat.jpg` works.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from server import errors
from server.http.status import HttpError
from server.json_jobs import (
    OPTION_KEYS,
    TOKEN_KEYS,
    Dialect,
    Slot,
    decode_images,
    json_type,
    parse_input,
    parse_options,
    shown,
)
from server.service import EmbedOptions

HTTP = Dialect("body", "request", ("timeout_ms",))
FORM_FIELDS = ("image", "images", *OPTION_KEYS, *TOKEN_KEYS, "timeout_ms")
_FIELD_BYTES = 1024  # an option field's value (pooling, normalize, timeout_ms) is a word
_CHUNK_BYTES = 256 * 1024
_DISPOSITION_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_FORM_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class Part:
    """One part of a multipart form: its name, whether it is a file (it has a file name) and its bytes."""

    name: str
    is_file: bool
    data: bytes


@dataclass(frozen=True)
class EmbedBody:
    """What a `/v1/embed` body asks for: its images (bytes, or the refusal of one), their form, options, timeout."""

    slots: list[Slot]
    single: bool
    options: EmbedOptions
    timeout_ms: float | None


def too_large(limit: int) -> HttpError:
    return HttpError(
        413,
        "INVALID_ARGUMENT",
        f"request body is over the limit of {limit} bytes (max_request_bytes): send fewer or smaller images "
        "per request",
    )


class BodyReader:
    """Reads request bodies within the bounds, a bounded number at once."""

    def __init__(self, max_bytes: int, receiving: asyncio.Semaphore, timeout_s: float) -> None:
        self.max_bytes = max_bytes
        self._receiving = receiving
        self._timeout_s = timeout_s

    def _check_headers(self, request: web.Request) -> None:
        """Refuses, before any byte is read, a compressed body or one whose declared size is over the limit."""
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

    async def receive(self, request: web.Request) -> bytes | list[Part]:
        """The whole body, or a multipart body's parts, read in a receive slot within `receive_timeout_s`."""
        self._check_headers(request)
        async with self._receiving:
            try:
                async with asyncio.timeout(self._timeout_s):
                    if request.content_type.startswith("multipart/"):
                        return await self._parts(request)
                    return await self._bytes(request)
            except TimeoutError:
                raise errors.InvalidRequest(
                    f"the request body did not arrive within {self._timeout_s:g} s (receive_timeout_s)"
                ) from None

    async def _bytes(self, request: web.Request) -> bytes:
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large(self.max_bytes)
        return bytes(body)

    async def _parts(self, request: web.Request) -> list[Part]:
        try:
            reader = await request.multipart()
        except (KeyError, ValueError) as exc:  # no boundary parameter, or a bad one
            raise errors.InvalidRequest(f"malformed multipart body ({str(exc)[:200]})") from None
        parts: list[Part] = []
        total = 0
        while True:
            try:
                part = await reader.next()
            except ValueError as exc:
                raise errors.InvalidRequest(f"malformed multipart body ({str(exc)[:200]})") from None
            if part is None:
                return parts
            if not isinstance(part, BodyPartReader):
                raise errors.InvalidRequest("nested multipart parts are not accepted: send each image as a file part")
            name, is_file = _disposition(part)
            if name not in FORM_FIELDS:
                raise errors.InvalidRequest(
                    f"unknown form field {shown(name)}; accepted: {', '.join(FORM_FIELDS)} (curl -F image=@cat.jpg)"
                )
            is_image = name in ("image", "images")
            data = await _read_part(part, self.max_bytes - total if is_image else _FIELD_BYTES)
            if data is None and is_image:
                raise too_large(self.max_bytes)
            if data is None:
                raise errors.InvalidRequest(f"form field {shown(name)} is over {_FIELD_BYTES} bytes: it takes a word")
            total += len(data)
            parts.append(Part(name, is_file, data))


def parse_json(raw: bytes | list[Part]) -> Any:
    """A JSON body's value; `InvalidRequest` naming what is wrong with it."""
    if isinstance(raw, list):
        raise errors.InvalidRequest("this route takes a JSON body, not a multipart form")
    if not raw.strip():
        raise errors.InvalidRequest("request body is empty: send a JSON object (Content-Type: application/json)")
    try:
        return json.loads(raw)
    except RecursionError:
        raise errors.InvalidRequest("request body is JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise errors.InvalidRequest(
            f"request body is not valid JSON ({str(exc)[:120]}): send a JSON object with "
            "Content-Type: application/json, or image files as multipart/form-data (curl -F image=@cat.jpg)"
        ) from None


def embed_body(raw: bytes | list[Part], max_images: int, max_image_bytes: int) -> EmbedBody:
    """A `/v1/embed` body, JSON or a form; the whole body is checked before any image is embedded."""
    if isinstance(raw, list):
        return _form_body(raw, max_images, max_image_bytes)
    value = parse_json(raw)
    job = parse_input(value, max_images, HTTP)
    slots = decode_images(job.images, max_image_bytes)
    return EmbedBody(slots, job.single, job.options, timeout_ms(value.get("timeout_ms")))


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


async def _read_part(part: BodyPartReader, limit: int) -> bytes | None:
    """The part's bytes, or None as soon as they pass `limit`."""
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK_BYTES):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


def timeout_ms(value: Any) -> float | None:
    """The optional `timeout_ms` (how long the server may take once it has the request), checked."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        said = value if isinstance(value, int | float) and not isinstance(value, bool) else json_type(value)
        raise errors.InvalidRequest(f'"timeout_ms" must be a positive number of milliseconds, not {said}', "timeout_ms")
    return float(value)


def _form_body(parts: list[Part], max_images: int, max_image_bytes: int) -> EmbedBody:
    """A multipart form's images and options; a part without a file name holds base64 or a data URL, as in JSON."""
    names = [part.name for part in parts]
    if ("image" in names) == ("images" in names):
        raise errors.InvalidRequest(
            'the form needs "image" (one file: -F image=@cat.jpg) or "images" parts (several: '
            "-F images=@a.jpg -F images=@b.jpg), not both or neither"
        )
    single = "image" in names
    images = [part for part in parts if part.name in ("image", "images")]
    if single and len(images) > 1:
        raise errors.InvalidRequest(
            f'the form has {len(images)} "image" parts: name several files "images" (-F images=@a.jpg -F images=@b.jpg)'
        )
    if len(images) > max_images:
        raise errors.InvalidRequest(f"the form has {len(images)} images, over the limit of {max_images} per request")
    fields = _fields(part for part in parts if part.name not in ("image", "images"))
    slots: list[Slot] = []
    for part in images:
        if part.is_file:
            slots.append(part.data)
        else:
            slots.extend(decode_images([part.data.decode("latin-1")], max_image_bytes))
    options = parse_options(fields)
    return EmbedBody(slots, single, options, timeout_ms(fields.get("timeout_ms")))


def _fields(parts: Iterable[Part]) -> dict[str, Any]:
    """The option fields of a form, as the JSON values they stand for ("true" -> true, "500" -> 500)."""
    fields: dict[str, Any] = {}
    for part in parts:
        if part.name in fields:
            raise errors.InvalidRequest(f"form field {shown(part.name)} is given twice")
        text = part.data.decode("utf-8", errors="replace").strip()
        if part.name == "normalize":
            if text.lower() not in _FORM_BOOLEANS:
                raise errors.InvalidRequest(f'"normalize" must be true or false, not {shown(text)}')
            fields[part.name] = _FORM_BOOLEANS[text.lower()]
        elif part.name == "patch_tokens" and text.lower() in _FORM_BOOLEANS:  # -F patch_tokens=true, or a dtype
            fields[part.name] = _FORM_BOOLEANS[text.lower()]
        elif part.name == "timeout_ms":
            try:
                fields[part.name] = float(text)
            except ValueError:
                raise errors.InvalidRequest(
                    f'"timeout_ms" must be a positive number of milliseconds, not {shown(text)}'
                ) from None
        else:
            fields[part.name] = text
    return fields
