"""Patch tokens in the JSON job shape (server/json_jobs.py): over RunPod and over HTTP, as over gRPC."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from runpod_handler import Worker
from server.config import Settings
from server.model import ModelRunner
from server.tokens import PatchTokens, as_float32
from tests import images
from tests.conftest import RunningServer, assert_close
from tests.test_http import error_of, form, post, url
from tests.test_http_openai import openai_error_of
from tests.test_tokens import reference_tokens

PHOTO = images.jpeg(320, 240, seed=3)
VIEWS = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tokens_of(answer: dict[str, Any]) -> np.ndarray:
    """One image's JSON tokens as float32 [rows, cols, dim]."""
    assert set(answer) == {"rows", "cols", "dim", "dtype", "data"}
    values = np.frombuffer(base64.b64decode(answer["data"]), VIEWS[answer["dtype"]])
    tokens = PatchTokens(answer["rows"], answer["cols"], answer["dtype"], values.reshape(-1, answer["dim"]))
    return as_float32(tokens)


@pytest.fixture(scope="module")
def worker(settings: Settings, runner: ModelRunner) -> Iterator[Worker]:
    started = Worker(settings, runner)
    yield started
    started.close()


async def test_a_runpod_job_returns_the_references_tokens(worker: Worker, model_dir: Path) -> None:
    output = await worker.handler({"id": "t", "input": {"image": b64(PHOTO), "patch_tokens": True}})
    assert list(output) == ["embedding", "patch_tokens"]
    assert output["patch_tokens"]["dtype"] == "float32" and output["patch_tokens"]["rows"] == 16
    assert_close(tokens_of(output["patch_tokens"]), reference_tokens(model_dir, PHOTO, 224), "runpod tokens")


async def test_a_runpod_batch_has_null_tokens_where_an_image_failed(worker: Worker) -> None:
    job = {"images": [b64(PHOTO), b64(b"not an image")], "patch_tokens": {"dtype": "bfloat16", "normalize": True}}
    output = await worker.handler({"id": "t", "input": job})
    assert list(output) == ["embeddings", "patch_tokens", "errors"]
    assert output["patch_tokens"][1] is None and output["errors"][0]["index"] == 1
    norms = np.linalg.norm(tokens_of(output["patch_tokens"][0]), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-2)
    plain = await worker.handler({"id": "t", "input": {"images": [b64(PHOTO)]}})
    assert "patch_tokens" not in plain


@pytest.mark.parametrize(
    ("value", "named"),
    [("int8", '"patch_tokens" must be true, one of float32'), ({"dtype": "fp8"}, '"patch_tokens.dtype"'),
     ({"size": 3}, "unknown \"patch_tokens\" key(s) 'size'"), (3, "not a number")],
)  # fmt: skip
async def test_a_bad_patch_tokens_value_is_refused_naming_it(worker: Worker, value: Any, named: str) -> None:
    output = await worker.handler({"id": "t", "input": {"image": b64(PHOTO), "patch_tokens": value}})
    assert output["error"].startswith("INVALID_ARGUMENT: ") and named in output["error"]


async def test_http_embed_returns_tokens_in_json_and_in_a_form(
    http: RunningServer, client: aiohttp.ClientSession, model_dir: Path
) -> None:
    body = {"images": [b64(PHOTO), b64(b"junk")], "patch_tokens": "float16"}
    status, answer = await post(client, url(http, "/v1/embed"), json=body)
    assert status == 200 and answer["patch_tokens"][1] is None
    expected = reference_tokens(model_dir, PHOTO, 224)
    got = tokens_of(answer["patch_tokens"][0])
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    status, single = await post(client, url(http, "/v1/embed"), data=form(("image", PHOTO), patch_tokens="float16"))
    assert status == 200 and single["patch_tokens"] == answer["patch_tokens"][0]
    status, exact = await post(client, url(http, "/v1/embed"), data=form(("image", PHOTO), patch_tokens="true"))
    assert status == 200 and exact["patch_tokens"]["dtype"] == "float32"


async def test_http_refuses_tokens_on_the_openai_route_and_bad_values(
    http: RunningServer, client: aiohttp.ClientSession
) -> None:
    data_url = "data:image/jpeg;base64," + b64(PHOTO)
    status, answer = await post(client, url(http, "/v1/embeddings"), json={"input": data_url, "patch_tokens": True})
    assert status == 400 and "patch_tokens" in openai_error_of(answer)["message"]
    status, answer = await post(client, url(http, "/v1/embed"), json={"image": b64(PHOTO), "patch_tokens": [1]})
    assert status == 400 and error_of(answer) == ("INVALID_ARGUMENT", error_of(answer)[1])
    assert '"patch_tokens" must be true' in error_of(answer)[1]


async def test_http_refuses_tokens_no_response_could_carry(
    make_server: Callable[..., RunningServer], client: aiohttp.ClientSession, runner: ModelRunner
) -> None:
    small = make_server(http_port=0, max_request_bytes=600_000)  # 32 KiB of float32 tokens per image
    body = {"images": [b64(images.png(seed=k)) for k in range(20)], "patch_tokens": True}
    status, answer = await post(client, url(small, "/v1/embed"), json=body)
    assert status == 400 and "send at most 18 images per request" in error_of(answer)[1]


def test_the_runpod_client_reads_the_same_tokens_as_the_grpc_client(model_dir: Path, server: RunningServer) -> None:
    from client import EmbedClient, EmbedItemsError
    from client.runpod_client import RunPodClient
    from tests.runpod_api import LocalRunPodApi

    datas = [images.png(seed=s) for s in range(3)]
    api = LocalRunPodApi(model_dir)
    try:
        with RunPodClient(base_url=api.url) as runpod, EmbedClient(server.address) as grpc_client:
            over_runpod = runpod.patch_tokens(datas, dtype="bfloat16")
            assert np.array_equal(over_runpod, grpc_client.patch_tokens(datas, dtype="bfloat16"))
            with pytest.raises(EmbedItemsError) as failed:
                runpod.patch_tokens([datas[0], b"junk"], ids=["a", "junk"], dtype="float16")
    finally:
        api.stop()
    assert over_runpod.shape == (3, 16, 16, 32) and over_runpod.dtype == np.float32
    assert [f.id for f in failed.value.failures] == ["junk"] and failed.value.embeddings.dtype == np.float16
