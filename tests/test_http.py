"""The HTTP/JSON transport, driven by a real HTTP client (aiohttp) against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest

from protos.dinov2.v1 import embed_pb2 as pb
from server import errors
from server.config import Settings
from server.http.status import STATUS_OF
from server.model import ModelRunner, Pooling
from tests import images, raw_http
from tests.conftest import ControlledRunner, Reference, RunningServer, assert_close, wait_for

GOOD = images.png(seed=4)
PHOTO = images.jpeg(320, 240, seed=3)
KEY = "http-s3cret-key-0123"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vec(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def url(running: RunningServer, path: str, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{running.server.http_port}{path}"


async def post(client: aiohttp.ClientSession, address: str, **kwargs: Any) -> tuple[int, Any]:
    async with client.post(address, **kwargs) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


def error_of(body: Any) -> tuple[str, str]:
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]["code"], body["error"]["message"]


def failing(exc: Exception) -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """A stand-in for `EmbedService.embedding` that raises `exc`."""

    @contextlib.asynccontextmanager
    async def embedding(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise exc
        yield

    return embedding


def form(*files: tuple[str, bytes], **fields: str) -> aiohttp.FormData:
    """A multipart form as `curl -F name=@file -F field=value` sends it."""
    data = aiohttp.FormData()
    for index, (name, content) in enumerate(files):
        data.add_field(name, content, filename=f"photo{index}.jpg", content_type="image/jpeg")
    for name, value in fields.items():
        data.add_field(name, value)
    return data


# ------------------------------------------------------------------- /v1/embed


def test_http_is_off_by_default(server: RunningServer) -> None:
    assert Settings().http_port is None
    assert server.server.http_port is None


async def test_one_image_equals_grpc_and_the_reference(
    http: RunningServer, client: aiohttp.ClientSession, reference: Reference
) -> None:
    status, body = await post(client, url(http, "/v1/embed"), json={"image": b64(PHOTO)})
    assert status == 200 and list(body) == ["embedding"]
    grpc_values = http.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=PHOTO)]), timeout=30).embeddings[0].values
    assert body["embedding"] == list(grpc_values)  # the same engine: the same float32 values
    assert_close(vec(body["embedding"]), reference.embed(PHOTO), "HTTP vs reference")
    status, as_url = await post(client, url(http, "/v1/embed"), json={"image": "data:image/jpeg;base64," + b64(PHOTO)})
    assert status == 200 and as_url == body


async def test_options_and_timeout_are_taken(
    http: RunningServer, client: aiohttp.ClientSession, reference: Reference
) -> None:
    job = {"images": [b64(GOOD), b64(PHOTO)], "pooling": "cls_mean", "normalize": True, "timeout_ms": 60_000}
    status, body = await post(client, url(http, "/v1/embed"), json=job)
    assert status == 200 and body["errors"] == []
    for index, data in enumerate((GOOD, PHOTO)):
        assert_close(vec(body["embeddings"][index]), reference.embed(data, Pooling.CLS_MEAN, True), f"image {index}")


async def test_a_bad_image_among_good_ones_fails_alone(
    http: RunningServer, client: aiohttp.ClientSession, reference: Reference
) -> None:
    job = {"images": [b64(GOOD), b64(b"not an image"), "%%% not base64", b64(PHOTO)]}
    status, body = await post(client, url(http, "/v1/embed"), json=job)
    assert status == 200 and set(body) == {"embeddings", "errors"}
    assert body["embeddings"][1:3] == [None, None]
    assert_close(vec(body["embeddings"][0]), reference.embed(GOOD), "image 0")
    assert_close(vec(body["embeddings"][3]), reference.embed(PHOTO), "image 3")
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(1, "INVALID_ARGUMENT"), (2, "INVALID_ARGUMENT")]
    assert "not a decodable image" in body["errors"][0]["message"]
    assert "not valid base64" in body["errors"][1]["message"]


async def test_a_bad_single_image_is_the_request_error(http: RunningServer, client: aiohttp.ClientSession) -> None:
    status, body = await post(client, url(http, "/v1/embed"), json={"image": b64(b"not an image")})
    assert status == 422
    assert error_of(body) == ("INVALID_ARGUMENT", "image: not a decodable image (unknown or unsupported format)")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"image": ', "request body is not valid JSON (Input data was truncated)"),
        (b'{"image": "x"} trailing', "request body is not valid JSON (JSON is malformed: trailing characters"),
        (b"", "request body is empty"),
        (b"[1, 2]", 'body must be an object with "image" or "images", not a list'),
        (b'{"image": "x", "normalise": true}', "unknown body key(s) 'normalise'; accepted: image, images, pooling"),
        (b'{"images": "x"}', '"images" must be a list of base64 strings, not a string'),
        (b'{"image": "x", "pooling": "max"}', "\"pooling\" must be one of cls, mean, cls_mean, not 'max'"),
        (b'{"image": "x", "timeout_ms": -5}', '"timeout_ms" must be a positive number of milliseconds, not -5'),
        (b'{"image": "x", "timeout_ms": "5"}', '"timeout_ms" must be a positive number of milliseconds, not a string'),
        (b"[" * 100_000, 'body must be an object with "image" or "images", not a list'),
        (b'{"image": "x", "pooling": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
async def test_a_malformed_body_is_400_naming_the_problem(
    http: RunningServer, client: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    headers = {"Content-Type": "application/json"}
    status, answer = await post(client, url(http, "/v1/embed"), data=body, headers=headers)
    code, said = error_of(answer)
    assert status == 400 and code == "INVALID_ARGUMENT" and message in said, said


async def test_too_many_images_is_400(make_server: Callable[..., RunningServer], client: aiohttp.ClientSession) -> None:
    small = make_server(http_port=0, max_images_per_request=2)
    status, body = await post(client, url(small, "/v1/embed"), json={"images": [b64(GOOD)] * 3})
    assert status == 400
    assert error_of(body)[1] == '"images" has 3 items, over the limit of 2 per request'


async def test_an_oversize_body_is_413_read_or_declared(
    make_server: Callable[..., RunningServer], client: aiohttp.ClientSession
) -> None:
    small = make_server(http_port=0, max_request_bytes=100_000)
    big = {"images": [b64(images.png(128, 128, seed=s)) for s in range(4)]}  # about 260 KB of JSON

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: refused while it is read
        yield b'{"images": ["' + b"A" * 150_000 + b'"]}'

    for kwargs in ({"json": big}, {"data": chunked(), "headers": {"Content-Type": "application/json"}}):
        status, body = await post(client, url(small, "/v1/embed"), **kwargs)
        code, message = error_of(body)
        assert status == 413 and code == "INVALID_ARGUMENT"
        assert message.startswith("request body is over the limit of 100000 bytes (max_request_bytes)")
    files = [("images", images.png(128, 128, seed=s)) for s in range(4)]
    status, body = await post(client, url(small, "/v1/embed"), data=form(*files))
    assert status == 413 and "over the limit of 100000 bytes" in error_of(body)[1]


async def test_a_compressed_body_is_refused(http: RunningServer, client: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, body = await post(client, url(http, "/v1/embed"), data=b"\x1f\x8b...", headers=headers)
    assert status == 415 and error_of(body)[0] == "UNIMPLEMENTED" and "send the body uncompressed" in error_of(body)[1]


async def test_a_body_that_stops_arriving_is_refused_after_receive_timeout_s(
    make_server: Callable[..., RunningServer], client: aiohttp.ClientSession
) -> None:
    slow = make_server(http_port=0, receive_timeout_s=0.3)
    answered = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"image": "'
        await answered.wait()  # the rest never comes while the server waits

    try:
        status, body = await post(client, url(slow, "/v1/embed"), data=stalled(),
                                  headers={"Content-Type": "application/json"})  # fmt: skip
    finally:
        answered.set()
    assert status == 408 and error_of(body) == (
        "DEADLINE_EXCEEDED",
        "the request body did not arrive within 0.3 s (receive_timeout_s): send it at once, or from nearer",
    )


# ------------------------------------------------------------------- multipart


async def test_multipart_upload_of_one_photo_and_of_several(
    http: RunningServer, client: aiohttp.ClientSession, reference: Reference
) -> None:
    status, body = await post(client, url(http, "/v1/embed"), data=form(("image", PHOTO)))
    assert status == 200 and list(body) == ["embedding"]
    assert_close(vec(body["embedding"]), reference.embed(PHOTO), "one file")
    files = [("images", PHOTO), ("images", b"not an image"), ("images", GOOD)]
    status, body = await post(client, url(http, "/v1/embed"), data=form(*files, pooling="mean", normalize="true"))
    assert status == 200 and body["embeddings"][1] is None
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(1, "INVALID_ARGUMENT")]
    assert_close(vec(body["embeddings"][0]), reference.embed(PHOTO, Pooling.MEAN, True), "file 0")
    assert_close(vec(body["embeddings"][2]), reference.embed(GOOD, Pooling.MEAN, True), "file 2")


async def test_a_multipart_field_without_a_file_name_is_base64(
    http: RunningServer, client: aiohttp.ClientSession, reference: Reference
) -> None:
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("image", "data:image/png;base64," + b64(GOOD))
    data.add_field("timeout_ms", "60000")
    status, body = await post(client, url(http, "/v1/embed"), data=data)
    assert status == 200
    assert_close(vec(body["embedding"]), reference.embed(GOOD), "base64 field")


@pytest.mark.parametrize(
    ("parts", "fields", "message"),
    [
        ([("image", GOOD), ("image", GOOD)], {}, 'the form has 2 "image" parts: name several files "images"'),
        ([("image", GOOD), ("images", GOOD)], {}, 'the form needs "image" (one file: -F image=@cat.jpg) or "images"'),
        ([("photo", GOOD)], {}, "unknown form field 'photo'; accepted: image, images, pooling, normalize, patch"),
        ([("image", GOOD)], {"normalize": "yes"}, "\"normalize\" must be true or false, not 'yes'"),
        ([("image", GOOD)], {"pooling": "max"}, "\"pooling\" must be one of cls, mean, cls_mean, not 'max'"),
        ([("image", GOOD)], {"timeout_ms": "soon"}, '"timeout_ms" must be a positive number of milliseconds'),
    ],
)
async def test_a_malformed_form_is_400_naming_the_problem(
    http: RunningServer, client: aiohttp.ClientSession, parts: list[tuple[str, bytes]], fields: dict[str, str],
    message: str,
) -> None:  # fmt: skip
    status, body = await post(client, url(http, "/v1/embed"), data=form(*parts, **fields))
    assert status == 400 and message in error_of(body)[1], body


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("multipart/form-data", b"--x\r\n", "malformed multipart body (boundary missed"),
        ("multipart/form-data; boundary=x", b"no boundary here\r\n", "malformed multipart body"),
    ],
)
async def test_a_broken_multipart_body_is_400(
    http: RunningServer, client: aiohttp.ClientSession, content_type: str, body: bytes, message: str
) -> None:
    status, answer = await post(client, url(http, "/v1/embed"), data=body, headers={"Content-Type": content_type})
    assert status == 400 and message in error_of(answer)[1], answer


# ------------------------------------------------------------ info, health, routes


async def test_info_has_the_grpc_info_fields(http: RunningServer, client: aiohttp.ClientSession) -> None:
    async with client.get(url(http, "/v1/info")) as response:
        assert response.status == 200
        info = await response.json()
    assert info == dataclasses.asdict(http.server.service.info)
    grpc_info = http.stub.Info(pb.InfoRequest(), timeout=10)
    assert info["embedding_dim"] == grpc_info.embedding_dim == 32 and info["model_id"] == grpc_info.model_id


async def test_unknown_routes_and_methods_answer_json(http: RunningServer, client: aiohttp.ClientSession) -> None:
    async with client.get(url(http, "/v2/embed")) as response:
        code, message = error_of(await response.json())
    assert response.status == 404 and code == "NOT_FOUND" and "POST /v1/embed" in message
    async with client.get(url(http, "/v1/embed")) as response:
        code, message = error_of(await response.json())
    assert response.status == 405 and response.headers["Allow"] == "POST" and "use POST" in message


async def test_health_is_200_serving_then_503_draining(
    make_server: Callable[..., RunningServer], client: aiohttp.ClientSession
) -> None:
    running = make_server(http_port=0)
    async with client.get(url(running, "/health")) as response:
        assert response.status == 200 and await response.json() == {"status": "SERVING"}
    running.server.service.begin_drain()
    for path in ("/health", "/healthz"):
        async with client.get(url(running, path)) as response:
            assert response.status == 503 and await response.json() == {"status": "NOT_SERVING"}
    status, body = await post(client, url(running, "/v1/embed"), json={"image": b64(GOOD)})
    assert status == 503 and error_of(body) == ("UNAVAILABLE", "server is draining")


async def test_a_drain_finishes_the_request_in_flight_and_answers_new_work_503(
    settings: Settings, runner: ModelRunner, client: aiohttp.ClientSession
) -> None:
    controlled = ControlledRunner(runner)
    running = RunningServer(dataclasses.replace(settings, http_port=0, max_wait_ms=0), controlled)
    stopping = None
    try:
        calls = controlled.calls
        controlled.allow(controlled.images_seen)  # the request's batch waits in the model
        in_flight = asyncio.ensure_future(post(client, url(running, "/v1/embed"), json={"image": b64(GOOD)}))
        await asyncio.to_thread(wait_for, lambda: controlled.calls > calls)
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(120), running.loop)
        await asyncio.to_thread(wait_for, lambda: not running.server.service.serving)
        async with client.get(url(running, "/health")) as response:
            assert response.status == 503
        status, body = await post(client, url(running, "/v1/embed"), json={"image": b64(GOOD)})
        assert status == 503 and error_of(body)[0] == "UNAVAILABLE"
        controlled.allow(float("inf"))
        status, body = await in_flight
        assert status == 200 and len(body["embedding"]) == 32
        await asyncio.wrap_future(stopping)  # the drain ended with the request, not after 120 s
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(url(running, "/health"))
    finally:
        controlled.allow(float("inf"))
        if stopping is None:
            running.stop(grace=1.0)
        else:
            await asyncio.wrap_future(stopping)
            running.channel.close()
            running.end_loop()


# ------------------------------------------------------------- key, TLS, bounds


async def test_the_api_key_is_required_except_for_health(
    make_server: Callable[..., RunningServer], client: aiohttp.ClientSession
) -> None:
    keyed = make_server(http_port=0, api_key=KEY)
    good = ("Authorization", f"Bearer {KEY}")
    for headers in ([], [("Authorization", "Bearer wrong")], [("Authorization", KEY)], [good, good]):
        status, body = await post(client, url(keyed, "/v1/embed"), json={"image": b64(GOOD)}, headers=headers)
        assert status == 401 and error_of(body)[0] == "UNAUTHENTICATED" and "Bearer <key>" in error_of(body)[1]
        async with client.get(url(keyed, "/v1/info"), headers=headers) as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    status, body = await post(client, url(keyed, "/v1/embed"), json={"image": b64(GOOD)}, headers=[good])
    assert status == 200 and len(body["embedding"]) == 32
    async with client.get(url(keyed, "/health")) as response:
        assert response.status == 200


async def test_tls_serves_https_from_the_same_files(
    make_server: Callable[..., RunningServer], client: aiohttp.ClientSession, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    secure = make_server(http_port=0, tls_cert=str(cert), tls_key=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    address = f"https://localhost:{secure.server.http_port}/v1/embed"
    status, body = await post(client, address, json={"image": b64(GOOD)}, ssl=context)
    assert status == 200 and len(body["embedding"]) == 32
    with pytest.raises(aiohttp.ClientError):
        await post(client, url(secure, "/v1/embed"), json={"image": b64(GOOD)})  # plain HTTP on the TLS port


async def test_calls_are_bounded_per_caller_together_with_grpc(
    make_server: Callable[..., RunningServer], runner: ModelRunner, client: aiohttp.ClientSession
) -> None:
    controlled = ControlledRunner(runner)
    running = make_server(controlled, http_port=0, max_calls_per_caller=1, max_wait_ms=0)
    calls = controlled.calls
    controlled.allow(controlled.images_seen)  # the first call's batch waits in the model
    try:
        first = asyncio.ensure_future(post(client, url(running, "/v1/embed"), json={"image": b64(GOOD)}))
        await asyncio.to_thread(wait_for, lambda: controlled.calls > calls)
        status, body = await post(client, url(running, "/v1/embed"), json={"image": b64(GOOD)})
        code, message = error_of(body)
        assert status == 429 and code == "RESOURCE_EXHAUSTED" and "too many calls from 127.0.0.1" in message
        with pytest.raises(grpc.RpcError) as info:
            running.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=GOOD)]), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        controlled.allow(float("inf"))
    status, _ = await first
    assert status == 200
    assert running.metrics.value("dinov2_refused_requests_total", {"reason": "calls"}) == 2


async def test_a_request_past_its_timeout_ms_is_504(
    make_server: Callable[..., RunningServer], runner: ModelRunner, client: aiohttp.ClientSession
) -> None:
    controlled = ControlledRunner(runner)
    running = make_server(controlled, http_port=0)
    controlled.allow(controlled.images_seen)  # the model never answers in time
    try:
        status, body = await post(client, url(running, "/v1/embed"), json={"image": b64(GOOD), "timeout_ms": 300})
    finally:
        controlled.allow(float("inf"))
    assert status == 504
    # which of the two the image gets depends on whether its batch reached the model before the deadline
    assert error_of(body) in {
        ("DEADLINE_EXCEEDED", "image: deadline passed before this image was embedded"),
        ("DEADLINE_EXCEEDED", "image: deadline passed while the image was queued"),
    }


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (errors.Overloaded("server is busy", reason="queue_time", retry_after_s=2.2), 429, "3"),
        (errors.Overloaded("server is at capacity"), 429, "1"),
        (errors.Unavailable("server is draining"), 503, "1"),
        (errors.InvalidRequest("request has no images"), 400, None),
    ],
)
async def test_engine_refusals_map_to_statuses(
    http: RunningServer, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
    exc: errors.EmbedError, status: int, retry_after: str | None,
) -> None:  # fmt: skip
    monkeypatch.setattr(http.server.service, "embedding", failing(exc))
    async with client.post(url(http, "/v1/embed"), json={"images": [b64(GOOD)]}) as response:
        assert response.status == status and response.headers.get("Retry-After") == retry_after
        assert error_of(await response.json())[1] == str(exc)


async def test_unexpected_failures_are_logged_not_leaked(
    http: RunningServer, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setattr(http.server.service, "embedding", failing(RuntimeError("secret internal detail")))
    status, body = await post(client, url(http, "/v1/embed"), json={"image": b64(GOOD)})
    assert status == 500
    assert error_of(body) == ("INTERNAL", "the server failed on this request; the details are in its log")
    assert "secret internal detail" in caplog.text and "Traceback" in caplog.text


def test_every_engine_error_has_a_status() -> None:
    assert set(errors.EmbedError.__subclasses__()) <= set(STATUS_OF)


# ------------------------------------------------------------ ids and metrics


async def test_request_id_is_echoed_or_made(http: RunningServer, client: aiohttp.ClientSession) -> None:
    async with client.get(url(http, "/v1/info"), headers={"X-Request-Id": "abc-123"}) as response:
        assert response.headers["X-Request-Id"] == "abc-123"
    async with client.post(url(http, "/v1/embed"), data=b"{") as response:
        assert len(response.headers["X-Request-Id"]) == 16


async def test_requests_are_counted_by_route_and_status(http: RunningServer, client: aiohttp.ClientSession) -> None:
    metrics = http.metrics

    def count(route: str, code: str) -> float:
        return metrics.value("dinov2_requests_total", {"method": f"HTTP {route}", "code": code})

    before = {key: count(*key) for key in [("/v1/embed", "200"), ("/v1/embed", "400"), ("unknown", "404")]}
    await post(client, url(http, "/v1/embed"), json={"image": b64(GOOD)})
    await post(client, url(http, "/v1/embed"), json={"image": 1})
    async with client.get(url(http, "/nowhere")):
        pass
    assert {key: count(*key) - value for key, value in before.items()} == dict.fromkeys(before, 1)


def test_an_answer_counts_in_the_bytes_in_flight_until_it_is_written(
    make_server: Callable[..., RunningServer],
) -> None:
    """256 images' patch tokens are about 22 MB of JSON: a caller that does not read keeps them in flight."""
    server = make_server(http_port=0)
    body = json.dumps({"images": [b64(GOOD)] * 256, "patch_tokens": True}).encode()
    answered_before = server.metrics.value("dinov2_images_total", {"outcome": "ok"})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer cannot hide in this socket's buffer
    sock.settimeout(raw_http.WAIT_S)
    with sock:
        sock.connect(("127.0.0.1", server.server.http_port))
        sock.sendall(raw_http.head("POST", "/v1/embed", {"Content-Type": "application/json"}, len(body)) + body)
        first = sock.recv(12)  # the answer has begun: its images are embedded and its JSON made
        assert first == b"HTTP/1.1 200"
        assert server.metrics.value("dinov2_images_total", {"outcome": "ok"}) == answered_before + 256
        assert server.metrics.value("dinov2_in_flight_images") == 256  # and in flight until the rest is written
        answer = raw_http.read_answer(sock, first)
    assert answer.status == 200
    tokens = answer.json()["patch_tokens"]
    assert len(tokens) == 256 and all(
        t["rows"] * t["cols"] * t["dim"] * 4 == len(base64.b64decode(t["data"])) for t in tokens
    )
    wait_for(lambda: server.metrics.value("dinov2_in_flight_images") == 0)
