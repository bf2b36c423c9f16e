"""JSON bodies decoded at a cost bounded before decoding, each value checked before the next is decoded.

`json.loads` builds a Python object for every value: a 64 MB body of `[]`
took 3.5 s with the GIL held and 1.5 GB. Here a body is decoded so that what
it costs is known from its size:

- Its values are counted first: every item of a list and entry of an object
  but the last is followed by a comma, so a body with more commas than a
  request can need (two per image, as a data URL holds one, and a few for
  the options) is refused before anything is decoded.
- Its top level is split by msgspec into raw JSON per key: views of the
  body, no copies, and a top level that is not an object fails at its first byte.
- An image's base64 string stays a view of the body until it is decoded to
  bytes (unescaped first only when the body has a backslash anywhere); a value
  of the wrong type is named by its first byte, never decoded.
- Other values (options) are decoded only when they are at most 4 KB.

So a body costs its bytes, plus 3/4 of them for the images decoded from it,
and no call holds the GIL for more than one scan of it (msgspec: about
30 ms for 128 MB on the development machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from server import errors
from server.json_jobs import ImageText, json_type

VALUES_PER_IMAGE = 2
"""Commas one image may bring: the one after it in the list, and the one of a data URL."""
OTHER_VALUES = 32
"""Commas the options may bring (a few keys, the patch_tokens object)."""
OPTION_BYTES = 4096
_COUNT_CHUNK = 1 << 20
_COMMA = ord(",")
_SAME_TYPE: dict[int, Any] = {ord('"'): "", ord("{"): {}, ord("["): [], ord("t"): True, ord("f"): False,
                              ord("n"): None}  # fmt: skip
"""A value of the same JSON type as one starting with this byte: enough for a message that names its type."""
_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_LIST = msgspec.json.Decoder(list[msgspec.Raw])
_STRING = msgspec.json.Decoder(str)


def job_object(
    body: bytes | bytearray, image_keys: Sequence[str], option_keys: Sequence[str], max_images: int
) -> dict[str, Any]:
    """The JSON object of a request body: under `image_keys`, image texts (a text or a list of them, as
    sent); under `option_keys`, their values; other keys are kept undecoded, for the message that names
    them. `InvalidRequest` names what is wrong, having decoded nothing past it."""
    head = bytes(body[:OPTION_BYTES]).lstrip()
    if not head and len(body) <= OPTION_BYTES:
        raise errors.InvalidRequest("request body is empty: send a JSON object (Content-Type: application/json)")
    _check_size(body, max_images)
    try:
        raw = _OBJECT.decode(body)
    except msgspec.ValidationError:  # valid JSON, but not an object
        said, keys = json_type(_SAME_TYPE.get(head[0], 0)), " or ".join(f'"{key}"' for key in image_keys)
        raise errors.InvalidRequest(f"body must be an object with {keys}, not {said}") from None
    except RecursionError:
        raise errors.InvalidRequest("request body is JSON nested too deeply") from None
    except msgspec.DecodeError as exc:
        raise _not_json(exc) from None
    views = body.find(b"\\") < 0  # no escapes anywhere: every string's text is its bytes
    return {
        key: _images(value, views) if key in image_keys else _small(key, value) if key in option_keys else value
        for key, value in raw.items()
    }


def _check_size(body: bytes | bytearray, max_images: int) -> None:
    """Refuses a body with more values than a request of `max_images` images can have, counting its commas
    (in chunks: numpy counts with the GIL released)."""
    bound = VALUES_PER_IMAGE * max_images + OTHER_VALUES
    values = np.frombuffer(body, dtype=np.uint8)
    commas = 0
    for start in range(0, len(values), _COUNT_CHUNK):
        commas += int(np.count_nonzero(values[start : start + _COUNT_CHUNK] == _COMMA))
        if commas > bound:
            raise errors.InvalidRequest(
                f"request body holds more JSON values than a request can ({bound}: at most {max_images} images, "
                "max_images_per_request, and the options): send fewer images per request"
            )


def _images(raw: msgspec.Raw, views: bool) -> Any:
    """An image key's value: its text, a list of texts, or a stand-in of its JSON type."""
    first = memoryview(raw)[0]
    if first == ord('"'):
        return _text(raw, views)
    if first != ord("["):
        return _SAME_TYPE.get(first, 0)
    try:
        items = _LIST.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None
    return [_text(item, views) if memoryview(item)[0] == ord('"') else _SAME_TYPE.get(memoryview(item)[0], 0)
            for item in items]  # fmt: skip


def _text(raw: msgspec.Raw, views: bool) -> ImageText:
    if views:
        return memoryview(raw)[1:-1]
    try:
        return _STRING.decode(raw)
    except msgspec.DecodeError as exc:
        raise _not_json(exc) from None


def _small(key: str, raw: msgspec.Raw) -> Any:
    if len(raw) > OPTION_BYTES:
        raise errors.InvalidRequest(f'"{key}" is {len(raw)} bytes of JSON, over {OPTION_BYTES}: it takes a word')
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None


def _not_json(exc: BaseException) -> errors.InvalidRequest:
    reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
    return errors.InvalidRequest(
        f"request body is not valid JSON ({reason}): send a JSON object with Content-Type: application/json, "
        "or image files as multipart/form-data (curl -F image=@cat.jpg)"
    )
