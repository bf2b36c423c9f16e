"""What `POST /v1/embed` bodies ask for: the JSON job (server/json_jobs.py, plus `timeout_ms`) or a form.

A multipart form holds file parts named `image` (one) or `images` (several)
and option fields beside them, so that `curl -F image=@cat.jpg` works; a part
without a file name holds base64 or a data URL, as in JSON. Bodies are read
by server/http/receive.py and parsed here, in its receive slot, off the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server import errors
from server.http.json_body import job_object
from server.http.receive import Body, Part
from server.json_jobs import (
    IMAGE_KEYS,
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
_FORM_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class EmbedBody:
    """What a `/v1/embed` body asks for: its images (bytes, or the refusal of one), their form, options, timeout."""

    slots: list[Slot]
    single: bool
    options: EmbedOptions
    timeout_ms: float | None


def json_only(body: Body) -> bytearray:
    """The bytes of a body that must be JSON."""
    if isinstance(body, list):
        raise errors.InvalidRequest("this route takes a JSON body, not a multipart form")
    return body


def embed_body(body: Body, max_images: int, max_image_bytes: int) -> EmbedBody:
    """A `/v1/embed` body, JSON or a form; the whole body is checked before any image is embedded."""
    if isinstance(body, list):
        return _form_body(body, max_images, max_image_bytes)
    options = [key for key in HTTP.keys if key not in IMAGE_KEYS]
    value = job_object(body, IMAGE_KEYS, options, max_images)
    job = parse_input(value, max_images, HTTP)
    slots = decode_images(job.images, max_image_bytes)
    return EmbedBody(slots, job.single, job.options, timeout_ms(value.get("timeout_ms")))


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
