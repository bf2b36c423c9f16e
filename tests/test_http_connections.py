"""The HTTP port's connections against raw sockets: header and keep-alive times, the cap per address, TLS."""

from __future__ import annotations

import base64
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from protos.dinov2.v1 import embed_pb2 as pb
from tests import images
from tests.conftest import RunningServer, wait_for
from tests.raw_http import ATTACKER, Answer, connect, head, read_answer, read_to_close, request

SMALL = images.png(seed=5)
EMBED_JSON = b'{"image": "' + base64.b64encode(SMALL) + b'"}'


def embed_request(source: str = "127.0.0.1", headers: dict[str, str] | None = None) -> bytes:
    return head("POST", "/v1/embed", {"Content-Type": "application/json", **(headers or {})}, len(EMBED_JSON)) + (
        EMBED_JSON
    )


def answered(answer: Answer) -> bool:
    return answer.status == 200 and len(answer.json()["embedding"]) > 0


def test_headers_that_never_complete_are_answered_408_and_closed(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(http_port=0, header_timeout_s=0.3)
    port = server.server.http_port
    with connect(port) as half, connect(port) as padded:
        half.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: test\r\n")
        padded.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n")
        for sock in (half, padded):
            answer = read_answer(sock)
            assert answer.status == 408 and answer.headers["connection"] == "close"
            assert answer.json()["error"]["code"] == "DEADLINE_EXCEEDED"
            assert "request headers not complete within 0.3 s of their first byte" in answer.json()["error"]["message"]
            assert read_to_close(sock) == b""
    assert answered(request(port, embed_request()))  # the port serves on


def test_an_idle_connection_closes_after_the_keepalive_time_without_an_answer(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(http_port=0, keepalive_timeout_s=0.3, header_timeout_s=0.3)
    with connect(server.server.http_port) as sock:
        sock.sendall(head("GET", "/health"))
        assert read_answer(sock).status == 200
        assert read_to_close(sock) == b""  # closed, and nothing more was sent: no 408 after a finished request
    with connect(server.server.http_port) as sock:  # a connection that never sends a byte
        assert read_to_close(sock) == b""


def test_one_address_holds_at_most_its_connections_and_others_are_served(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(http_port=0, max_connections_per_address=3)
    port = server.server.http_port
    held = [connect(port, ATTACKER) for _ in range(3)]
    try:
        for sock in held:  # each is open (served), so the server has counted it
            sock.sendall(head("GET", "/health"))
            assert read_answer(sock).status == 200
        with connect(port, ATTACKER) as extra:
            answer = read_answer(extra)
            assert answer.status == 429 and answer.headers["retry-after"] == "1"
            assert (
                "too many connections from this address at once (3, max_connections_per_address)"
                in (answer.json()["error"]["message"])
            )
            assert read_to_close(extra) == b""
        assert answered(request(port, embed_request()))  # 127.0.0.1 is another address
    finally:
        held.pop().close()

    def accepted_again() -> bool:
        with connect(port, ATTACKER) as sock:
            sock.sendall(head("GET", "/health"))
            return read_answer(sock).status == 200

    wait_for(accepted_again)
    for sock in held:
        sock.close()


def test_a_trusted_proxy_is_not_held_to_the_connection_cap(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(http_port=0, max_connections_per_address=1, trusted_proxies=ATTACKER)
    port = server.server.http_port
    with connect(port, ATTACKER) as first, connect(port, ATTACKER) as second:
        for sock in (first, second):
            sock.sendall(head("GET", "/health"))
            assert read_answer(sock).status == 200


def test_a_tls_handshake_that_never_comes_is_closed(
    make_server: Callable[..., RunningServer], certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server = make_server(http_port=0, tls_cert=str(cert), tls_key=str(key), header_timeout_s=0.3)
    with connect(server.server.http_port) as sock:
        assert read_to_close(sock) == b""  # no ClientHello: closed at the handshake time
    context = ssl.create_default_context(cafile=str(cert))
    with connect(server.server.http_port) as raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(embed_request())
        assert answered(read_answer(tls))


def test_a_header_line_over_the_limit_is_400_logged_in_one_line(
    http: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        answer = request(http.server.http_port, head("GET", "/health", {"X-Pad": "p" * 9000}))
    assert answer.status == 400
    from_aiohttp = [record for record in caplog.records if record.name == "aiohttp.server"]
    assert [(r.levelno, r.exc_info) for r in from_aiohttp] == [(logging.INFO, None)]
    assert from_aiohttp[0].getMessage().startswith("HTTP request refused (400): Got more than 8190 bytes")


def test_slow_and_half_sent_callers_lock_out_no_one(make_server: Callable[..., RunningServer]) -> None:
    """The attack of the HTTP door's issue, scaled down: one address holds slow uploads and half-sent headers;
    another's small HTTP and gRPC calls are answered meanwhile."""
    server = make_server(http_port=0, receive_grace_s=60.0, receive_timeout_s=60.0, max_queue_s=60.0)
    port = server.server.http_port
    slow = [connect(port, ATTACKER) for _ in range(server.server.settings.max_receiving_requests + 4)]
    half = [connect(port, ATTACKER) for _ in range(40)]
    try:
        for sock in slow:
            sock.sendall(head("POST", "/v1/embed", {"Content-Type": "application/json"}, 100_000) + b'{"image": "')
        for index, sock in enumerate(half):
            sock.sendall(b"POST /v1/embed HTTP/1.1\r\n" + (b"X-Pad: " + b"p" * 4000 + b"\r\n") * (index % 2) * 8)
        settings = server.server.settings
        wait_for(lambda: server.server.slots.held_by(ATTACKER) == settings.max_receiving_per_caller)
        for _ in range(3):
            assert answered(request(port, embed_request()))
            reply = server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=SMALL)]), timeout=60)
            assert reply.embeddings[0].values
    finally:
        for sock in slow + half:
            sock.close()


def test_the_connection_count_comes_back_when_callers_leave(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(http_port=0)
    connections = [connect(server.server.http_port, ATTACKER) for _ in range(20)]
    for sock in connections:
        sock.sendall(b"GET /heal")
    wait_for(lambda: _open_from(server, ATTACKER) == 20)
    for sock in connections:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    wait_for(lambda: _open_from(server, ATTACKER) == 0)


def _open_from(server: RunningServer, address: str) -> int:
    http = server.server._http
    assert http is not None and http.connections is not None
    return http.connections.by_address[address]
