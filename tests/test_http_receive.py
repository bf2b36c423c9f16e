"""HTTP bodies against raw sockets: the pace, the receive slots (shared with gRPC), 100-continue, forms, the caller."""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable, Iterator

import grpc
import pytest

from protos.dinov2.v1 import embed_pb2 as pb
from tests import images
from tests.conftest import RunningServer, wait_for
from tests.raw_http import ATTACKER, connect, head, read_answer, request

SMALL = images.png(seed=6)
JSON = {"Content-Type": "application/json"}
EMBED_JSON = b'{"image": "' + base64.b64encode(SMALL) + b'"}'


def embed(headers: dict[str, str] | None = None) -> bytes:
    return head("POST", "/v1/embed", {**JSON, **(headers or {})}, len(EMBED_JSON)) + EMBED_JSON


def stalled(port: int, source: str = ATTACKER, headers: dict[str, str] | None = None) -> socket.socket:
    """A connection whose JSON body stops after its first bytes."""
    sock = connect(port, source)
    sock.sendall(head("POST", "/v1/embed", {**JSON, **(headers or {})}, 100_000) + b'{"image": "')
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_a_body_slower_than_the_minimum_rate_is_cut_408(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(http_port=0, receive_grace_s=0.2, min_receive_rate=1000)
    with stalled(server.server.http_port) as sock:
        answer = read_answer(sock)  # 11 bytes in: cut once the pace needs more than 11, at 0.2 s + 11 ms
    assert answer.status == 408
    error = answer.json()["error"]
    assert error["code"] == "DEADLINE_EXCEEDED"
    assert "slower than 1000 bytes/s (min_receive_rate, after receive_grace_s)" in error["message"]
    assert server.server.slots.held == 0  # its slot is free again


def test_one_caller_holds_its_share_of_receive_slots_and_others_are_read(
    make_server: Callable[..., RunningServer], sockets: list[socket.socket]
) -> None:
    server = make_server(
        http_port=0, max_receiving_requests=2, max_receiving_per_caller=1, receive_grace_s=300.0,
        receive_timeout_s=300.0, max_queue_s=300.0,
    )  # fmt: skip
    port = server.server.http_port
    sockets += [stalled(port) for _ in range(3)]
    wait_for(lambda: server.server.slots.held_by(ATTACKER) == 1)
    assert server.server.slots.held == 1  # its two others wait: the second slot stays free for someone else
    answer = request(port, embed())
    assert answer.status == 200 and answer.json()["embedding"]
    assert server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=SMALL)]), timeout=60).embeddings[0].values


def test_a_wait_for_a_slot_ends_429_with_retry_after_and_grpc_is_refused_too(
    make_server: Callable[..., RunningServer], sockets: list[socket.socket]
) -> None:
    server = make_server(
        http_port=0, max_receiving_requests=1, max_receiving_per_caller=1, receive_grace_s=300.0,
        receive_timeout_s=300.0, max_queue_s=0.2,
    )  # fmt: skip
    sockets.append(stalled(server.server.http_port))
    wait_for(lambda: server.server.slots.held == 1)
    answer = request(server.server.http_port, embed())
    assert answer.status == 429 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["message"].startswith("no receive slot for this request body within")
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=SMALL)]), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no receive slot for this request body" in refused.value.details()
    assert server.metrics.value("dinov2_refused_requests_total", {"reason": "receive"}) >= 1


def test_100_continue_comes_only_after_the_key_and_the_size(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(http_port=0, api_key="k3y", max_request_bytes=200_000)
    port = server.server.http_port
    expect = {"Expect": "100-continue"}
    for headers, length, status in (
        (expect, len(EMBED_JSON), 401),  # no key
        ({**expect, "Authorization": "Bearer k3y"}, 300_000, 413),  # over max_request_bytes
    ):
        with connect(port) as sock:
            sock.sendall(head("POST", "/v1/embed", {**JSON, **headers}, length))  # the body is never sent
            first = sock.recv(12)
            assert first == f"HTTP/1.1 {status}".encode()[:12], first
    with connect(port) as sock:
        sock.sendall(head("POST", "/v1/embed", {**JSON, **expect, "Authorization": "Bearer k3y"}, len(EMBED_JSON)))
        assert sock.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(EMBED_JSON)
        assert read_answer(sock).status == 200


def test_a_key_that_is_not_utf8_is_401(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(http_port=0, api_key="k3y")
    answer = request(server.server.http_port, embed({"Authorization": "Bearer \udcff"}))
    assert answer.status == 401 and answer.json()["error"]["code"] == "UNAUTHENTICATED"


def multipart(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    body = (
        b"".join(b"--" + boundary.encode() + b"\r\n" + part for part in parts) + b"--" + boundary.encode() + b"--\r\n"
    )
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return head("POST", "/v1/embed", ctype, len(body)) + body


IMAGE_PART = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + SMALL + b"\r\n"


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([b'Content-Disposition: form-data; name="images"\r\n\r\nx\r\n'] * 10_000, "the form has more than"),
        ([b"".join(b"X-%d: v\r\n" % i for i in range(200)) + IMAGE_PART], "malformed multipart body"),
        ([b"X-Long: " + b"v" * 9000 + b"\r\n" + IMAGE_PART], "malformed multipart body"),
        ([b"no colon here\r\n" + IMAGE_PART], "malformed multipart body"),
    ],
)
def test_a_form_of_too_many_parts_or_bad_part_headers_is_400(
    http: RunningServer, parts: list[bytes], message: str
) -> None:
    answer = request(http.server.http_port, multipart(parts))
    assert answer.status == 400 and answer.json()["error"]["code"] == "INVALID_ARGUMENT", answer
    assert message in answer.json()["error"]["message"]
    assert len(answer.body) < 1000


def test_a_trusted_proxy_names_the_caller_of_the_call_bounds(
    make_server: Callable[..., RunningServer], sockets: list[socket.socket]
) -> None:
    server = make_server(
        http_port=0, max_calls_per_caller=1, trusted_proxies=ATTACKER, receive_grace_s=300.0,
        receive_timeout_s=300.0,
    )  # fmt: skip
    port = server.server.http_port
    sockets.append(stalled(port, headers={"X-Forwarded-For": "198.51.100.1"}))  # a call held open
    wait_for(lambda: server.server.calls.calls_of("198.51.100.1") == 1)
    again = request(port, embed({"X-Forwarded-For": "198.51.100.1"}), ATTACKER)
    assert again.status == 429 and "too many calls from 198.51.100.1" in again.json()["error"]["message"]
    assert request(port, embed({"X-Forwarded-For": "198.51.100.2"}), ATTACKER).status == 200
    # Not through a trusted proxy, X-Forwarded-For names no one: the caller is the peer address
    sockets.append(stalled(port, "127.0.0.1", headers={"X-Forwarded-For": "198.51.100.9"}))
    wait_for(lambda: server.server.calls.calls_of("127.0.0.1") == 1)
    assert server.server.calls.calls_of("198.51.100.9") == 0


def test_a_refused_body_counts_for_the_memory_policy(http: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    told: list[int] = []
    monkeypatch.setattr(http.server.service._memory, "received", told.append)
    body = b'{"images": [' + b"[]," * 10_000 + b"[]]}"
    answer = request(http.server.http_port, head("POST", "/v1/embed", JSON, len(body)) + body)
    assert answer.status == 400 and "holds more JSON values than a request can" in answer.json()["error"]["message"]
    assert told == [len(body)]
