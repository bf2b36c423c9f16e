"""`POST /v1/embeddings` (server/http/openai.py), OpenAI's shape, driven by a real HTTP client (aiohttp)."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import numpy as np
import pytest

from server.model import Pooling
from tests.conftest import Reference, RunningServer, assert_close
from tests.test_http import GOOD, PHOTO, b64, error_of, post, url, vec

PHOTO_URL = "data:image/jpeg;base64," + b64(PHOTO)


def norm(values: list[float]) -> float:
    return float(np.linalg.norm(np.array(values, dtype=np.float64)))


# ----------------------------------------------------------------- answers


async def test_round_trip_in_float_and_base64_of_unit_length(
    http: RunningServer, client: aiohttp.ClientSession, reference: Reference
) -> None:
    inputs = [PHOTO_URL, b64(GOOD)]
    status, floats = await post(client, url(http, "/v1/embeddings"),
                                json={"input": inputs, "model": "dinov2", "user": "someone"})  # fmt: skip
    assert status == 200
    assert floats["object"] == "list" and floats["model"] == http.server.service.info.model_id
    assert floats["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert [(d["object"], d["index"]) for d in floats["data"]] == [("embedding", 0), ("embedding", 1)]
    for index, data in enumerate((PHOTO, GOOD)):
        values = floats["data"][index]["embedding"]
        assert abs(norm(values) - 1.0) <= 1e-6, f"input {index}: length {norm(values)}"  # float32 rounding
        assert_close(vec(values), reference.embed(data, Pooling.CLS, normalize=True), f"float {index}")
    status, packed = await post(client, url(http, "/v1/embeddings"),
                                json={"input": inputs, "model": "dinov2", "encoding_format": "base64"})  # fmt: skip
    assert status == 200
    for index in range(2):
        decoded = np.frombuffer(base64.b64decode(packed["data"][index]["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, vec(floats["data"][index]["embedding"]))
    status, one = await post(client, url(http, "/v1/embeddings"), json={"input": inputs[0], "dimensions": 32})
    assert status == 200 and one["data"][0]["embedding"] == floats["data"][0]["embedding"]


async def test_normalize_false_gives_the_raw_embedding_of_v1_embed(
    http: RunningServer, client: aiohttp.ClientSession, reference: Reference
) -> None:
    status, raw = await post(client, url(http, "/v1/embeddings"), json={"input": PHOTO_URL, "normalize": False})
    assert status == 200
    assert_close(vec(raw["data"][0]["embedding"]), reference.embed(PHOTO), "raw")
    assert abs(norm(raw["data"][0]["embedding"]) - 1.0) > 1e-3  # the tiny model's raw CLS is not of length 1
    status, embed = await post(client, url(http, "/v1/embed"), json={"image": b64(PHOTO)})
    assert status == 200 and embed["embedding"] == raw["data"][0]["embedding"]  # /v1/embed keeps its default
    status, both = await post(client, url(http, "/v1/embeddings"), json={"input": PHOTO_URL, "pooling": "cls_mean"})
    assert status == 200
    assert_close(vec(both["data"][0]["embedding"]), reference.embed(PHOTO, Pooling.CLS_MEAN, True), "cls_mean")


async def test_a_failed_input_fails_the_request_naming_each_failed_input(
    http: RunningServer, client: aiohttp.ClientSession
) -> None:
    inputs = [b64(GOOD), b64(b"not an image"), b64(GOOD), "%%%"]
    status, body = await post(client, url(http, "/v1/embeddings"), json={"input": inputs})
    code, message = error_of(body)
    assert status == 422 and code == "INVALID_ARGUMENT"
    assert message.startswith("2 of 4 inputs failed: input[1]: INVALID_ARGUMENT: not a decodable image")
    assert "input[3]: INVALID_ARGUMENT: not valid base64" in message and "POST /v1/embed" in message


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"model": "x"}, 'body needs "input"'),
        ({"input": [[1, 2, 3]]}, "input[0] must be a data URL or base64 string, not a list"),
        ({"input": "x", "encoding_format": "int8"}, "\"encoding_format\" must be float or base64, not 'int8'"),
        ({"input": "x", "dimensions": 16}, '"dimensions" must be 32, this model\'s embedding size, not 16'),
        ({"input": "x", "dimensions": 32, "pooling": "cls_mean"}, '"dimensions" must be 64'),
        ({"input": "x", "temperature": 1}, "unknown body key(s) 'temperature'"),
    ],
)
async def test_a_request_it_cannot_honour_is_400(
    http: RunningServer, client: aiohttp.ClientSession, request_body: dict[str, Any], message: str
) -> None:
    status, body = await post(client, url(http, "/v1/embeddings"), json=request_body)
    assert status == 400 and message in error_of(body)[1], body
