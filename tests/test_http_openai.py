"""`POST /v1/embeddings` (server/http/openai.py), OpenAI's shape: driven by aiohttp, and by OpenAI's own client."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest

from server import errors
from server.model import Pooling
from tests.conftest import Reference, RunningServer, assert_close
from tests.test_http import GOOD, KEY, PHOTO, b64, failing, post, url, vec

PHOTO_URL = "data:image/jpeg;base64," + b64(PHOTO)


def openai_error_of(body: Any) -> dict[str, Any]:
    """The error of an answer in OpenAI's shape, exactly its four keys."""
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


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
    assert floats["object"] == "list" and floats["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
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


async def test_the_answer_names_the_served_model_whatever_the_request_says(
    http: RunningServer, make_server: Callable[..., RunningServer], client: aiohttp.ClientSession
) -> None:
    folder = Path(http.server.settings.model)
    assert folder.is_dir()
    status, body = await post(client, url(http, "/v1/embeddings"), json={"input": PHOTO_URL, "model": "gpt-4"})
    assert status == 200 and body["model"] == folder.name  # the folder's name, never its path
    named = make_server(http_port=0, served_model_name="dinov2-small")
    status, body = await post(client, url(named, "/v1/embeddings"), json={"input": PHOTO_URL, "model": "x"})
    assert status == 200 and body["model"] == "dinov2-small"


# ------------------------------------------------------------------ errors


async def test_a_failed_input_fails_the_request_naming_each_failed_input(
    http: RunningServer, client: aiohttp.ClientSession
) -> None:
    inputs = [b64(GOOD), b64(b"not an image"), b64(GOOD), "%%%"]
    status, body = await post(client, url(http, "/v1/embeddings"), json={"input": inputs})
    error = openai_error_of(body)
    assert status == 422
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "input", "INVALID_ARGUMENT")
    assert error["message"].startswith("2 of 4 inputs failed: input[1]: INVALID_ARGUMENT: not a decodable image")
    assert "input[3]: INVALID_ARGUMENT: not valid base64" in error["message"]
    assert "POST /v1/embed" in error["message"]


@pytest.mark.parametrize(
    ("request_body", "param", "message"),
    [
        ({"model": "x"}, "input", 'body needs "input"'),
        ({"input": []}, "input", '"input" is empty: send at least one image'),
        ({"input": [[1, 2, 3]]}, "input", "input[0] must be a data URL or base64 string, not a list"),
        ({"input": "x", "model": 7}, "model", '"model" must be a string, not a number'),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "must be float or base64, not 'int8'"),
        ({"input": "x", "dimensions": 16}, "dimensions", '"dimensions" must be 32, this model\'s embedding size'),
        ({"input": "x", "dimensions": 32, "pooling": "cls_mean"}, "dimensions", '"dimensions" must be 64'),
        ({"input": "x", "pooling": "max"}, "pooling", "\"pooling\" must be one of cls, mean, cls_mean, not 'max'"),
        ({"input": "x", "normalize": "yes"}, "normalize", '"normalize" must be true or false, not a string'),
        ({"input": "x", "timeout_ms": -5}, "timeout_ms", '"timeout_ms" must be a positive number of milliseconds'),
        ({"input": "x", "temperature": 1}, None, "unknown body key(s) 'temperature'"),
        ([{"input": "x"}], None, 'body must be an object with "input", not a list'),
    ],
)
async def test_a_request_it_cannot_honour_is_400_naming_the_field(
    http: RunningServer, client: aiohttp.ClientSession, request_body: Any, param: str | None, message: str
) -> None:
    status, body = await post(client, url(http, "/v1/embeddings"), json=request_body)
    error = openai_error_of(body)
    assert status == 400 and message in error["message"], body
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "INVALID_ARGUMENT")


async def test_the_transport_s_own_refusals_take_openai_s_shape(
    make_server: Callable[..., RunningServer], client: aiohttp.ClientSession
) -> None:
    keyed = make_server(http_port=0, api_key=KEY, max_request_bytes=100_000)
    address, good = url(keyed, "/v1/embeddings"), {"Authorization": f"Bearer {KEY}"}
    status, body = await post(client, address, json={"input": PHOTO_URL}, headers={"Authorization": "Bearer no"})
    error = openai_error_of(body)
    assert status == 401 and (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", None, "UNAUTHENTICATED")  # fmt: skip
    assert "Bearer <key>" in error["message"]
    status, body = await post(client, address, data=b'{"input": ', headers=good)
    error = openai_error_of(body)
    assert status == 400 and error["param"] is None and "not valid JSON" in error["message"]
    status, body = await post(client, address, json={"input": "A" * 150_000}, headers=good)
    error = openai_error_of(body)
    assert status == 413 and (error["type"], error["code"]) == ("invalid_request_error", "INVALID_ARGUMENT")
    async with client.get(address, headers=good) as response:
        error = openai_error_of(await response.json())
    assert response.status == 405 and (error["type"], error["code"]) == ("invalid_request_error", "UNIMPLEMENTED")
    status, body = await post(client, url(keyed, "/v1/embed"), json={"image": b64(GOOD)})
    assert status == 401 and set(body["error"]) == {"code", "message"}  # other routes keep their shape


@pytest.mark.parametrize(
    ("exc", "status", "kind", "code"),
    [
        (errors.Overloaded("server is busy", reason="queue_time", retry_after_s=2.2), 429, "requests",
         "RESOURCE_EXHAUSTED"),
        (errors.Unavailable("server is draining"), 503, "server_error", "UNAVAILABLE"),
        (RuntimeError("secret internal detail"), 500, "server_error", "INTERNAL"),
    ],
)  # fmt: skip
async def test_engine_refusals_and_failures_take_openai_s_shape(
    http: RunningServer, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
    exc: Exception, status: int, kind: str, code: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(http.server.service, "embedding", failing(exc))
    answer_status, body = await post(client, url(http, "/v1/embeddings"), json={"input": b64(GOOD)})
    error = openai_error_of(body)
    assert answer_status == status and (error["type"], error["param"], error["code"]) == (kind, None, code)
    assert "secret" not in error["message"]


# ------------------------------------------------------- OpenAI's own client


def test_openai_s_python_client_embeds_and_raises_its_errors(http: RunningServer, reference: Reference) -> None:
    with openai.OpenAI(base_url=url(http, "/v1"), api_key="x", max_retries=0) as client:
        answer = client.embeddings.create(model="dinov2", input=[PHOTO_URL, b64(GOOD)])  # base64 on the wire
        floats = client.embeddings.create(model="dinov2", input=PHOTO_URL, encoding_format="float")
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model="dinov2", input=PHOTO_URL, dimensions=16)
        with pytest.raises(openai.UnprocessableEntityError) as undecodable:
            client.embeddings.create(model="dinov2", input=b64(b"not an image"))
    assert answer.model == Path(http.server.settings.model).name and [d.index for d in answer.data] == [0, 1]
    for index, data in enumerate((PHOTO, GOOD)):
        assert_close(vec(answer.data[index].embedding), reference.embed(data, Pooling.CLS, True), f"input {index}")
    assert floats.data[0].embedding == answer.data[0].embedding
    assert bad.value.status_code == 400 and bad.value.type == "invalid_request_error"
    assert (bad.value.param, bad.value.code) == ("dimensions", "INVALID_ARGUMENT")
    assert '"dimensions" must be 32, this model\'s embedding size, not 16' in bad.value.message
    assert undecodable.value.param == "input" and "not a decodable image" in undecodable.value.message
