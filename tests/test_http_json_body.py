"""JSON bodies decoded at a bounded cost: a wrong shape fails before objects are built, images stay views."""

from __future__ import annotations

import base64
import json
import tracemalloc
from collections.abc import Callable

import pytest

from server import errors
from server.http.bodies import embed_body
from server.http.json_body import OPTION_BYTES, job_object
from server.json_jobs import decode_base64
from tests import images

IMAGE_KEYS = ("image", "images")
OPTIONS = ("pooling", "normalize", "patch_tokens", "timeout_ms")
MB = 1 << 20


def decoded(body: bytes | bytearray, max_images: int = 256) -> dict:
    return job_object(body if isinstance(body, bytearray) else bytearray(body), IMAGE_KEYS, OPTIONS, max_images)


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(errors.InvalidRequest) as refused:
        call()
    return str(refused.value)


def peak_bytes(call: Callable[[], object]) -> int:
    """The most memory `call` allocated at once (Python objects, msgspec's and numpy's buffers)."""
    tracemalloc.start()
    try:
        call()
    except errors.InvalidRequest:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    "body",
    [
        b"[" + b"[]," * (16 * MB // 3) + b"[]]",
        b'{"images": [' + b"[]," * (16 * MB // 3) + b"[]]}",
        b'{"images": [' + b'"",' * (16 * MB // 3) + b'""]}',
        b'{"image": "x", "pooling": {' + b'"k": 1,' * (16 * MB // 7) + b'"k": 1}}',
    ],
)
def test_a_body_of_many_values_is_refused_before_any_is_built(body: bytes) -> None:
    received = bytearray(body)
    message = refusal(lambda: decoded(received))
    assert message.startswith("request body holds more JSON values than a request can (544: at most 256 images")
    assert peak_bytes(lambda: decoded(received)) < 4 * MB  # json.loads built 24 times the body


def test_a_top_level_that_is_not_an_object_fails_at_its_first_byte() -> None:
    body = bytearray(b"[" + b"1" * (16 * MB) + b"]")
    assert refusal(lambda: decoded(body)) == 'body must be an object with "image" or "images", not a list'
    assert peak_bytes(lambda: decoded(body)) < 4 * MB


def test_image_strings_stay_views_of_the_body_and_decode_to_their_bytes() -> None:
    data = images.png(seed=1)
    text = base64.b64encode(data).decode()
    body = json.dumps({"images": [text, "data:image/png;base64," + text], "pooling": "mean"}).encode()
    value = decoded(body)
    assert all(isinstance(item, memoryview) for item in value["images"]) and value["pooling"] == "mean"
    assert [decode_base64(item, 10 * MB) for item in value["images"]] == [data, data]


def test_escaped_strings_are_unescaped_first() -> None:
    data = images.png(seed=2)
    escaped = base64.b64encode(data).decode().replace("/", "\\/")  # as PHP's json_encode writes a slash
    value = decoded(b'{"image": "' + escaped.encode() + b'"}')
    assert isinstance(value["image"], str) and decode_base64(value["image"], 10 * MB) == data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"images": ["aGk=", 5]}', "images[1] must be a base64 string, not a number"),
        (b'{"images": ["aGk=", {"a": "' + b"x" * MB + b'"}]}', "images[1] must be a base64 string, not an object"),
        (b'{"image": ["aGk="]}', "image must be a base64 string, not a list"),
        (b'{"images": "aGk="}', '"images" must be a list of base64 strings, not a string'),
        (b'{"image": "aGk=", "pooling": "' + b"m" * OPTION_BYTES + b'"}', f'"pooling" is {OPTION_BYTES + 2} bytes'),
        (b'{"image": "aGk=", "timeout_ms": "5"}', '"timeout_ms" must be a positive number of milliseconds'),
    ],
)
def test_a_value_of_the_wrong_type_is_named_without_being_decoded(body: bytes, message: str) -> None:
    assert message in refusal(lambda: embed_body(bytearray(body), 256, 10 * MB))


def test_unknown_keys_are_named_three_at_most() -> None:
    body = json.dumps({"image": "aGk=", **{f"key{i}": "x" * 100 for i in range(500)}}).encode()
    message = refusal(lambda: embed_body(bytearray(body), 256, 10 * MB))
    assert message.startswith("unknown body key(s) 'key0', 'key1', 'key2' and 497 more; accepted: image, images")
    assert len(message) < 300
