"""HTTP/1.1 over raw sockets, for tests that send what no client library would: half requests, slow bodies,
bytes that are not UTF-8, from a chosen loopback address (all of 127/8 reaches the server on Linux)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from bench.loopback import SECOND_CALLER

ATTACKER = SECOND_CALLER
"""A second caller's address on one machine: the server sees it as another peer (bench/loopback.py)."""
WAIT_S = 60.0
"""How long a test waits for the server to answer or close: a bound for a broken server, never met by a working one."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def head(method: str, path: str, headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    """A request's line and headers, Host and Content-Length included."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def read_answer(sock: socket.socket, begun: bytes = b"") -> Answer:
    """One answer (interim 1xx answers skipped; `begun`: its bytes already read); its body by Content-Length,
    or up to the close."""
    buffer = begun
    while True:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {buffer[:200]!r}"
            buffer += chunk
        header, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status >= 200:
            break
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside an answer"
            buffer += chunk
        return Answer(status, headers, buffer[:length])
    return Answer(status, headers, buffer + read_to_close(sock))


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a close)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def request(port: int, raw: bytes, source: str = "127.0.0.1") -> Answer:
    with connect(port, source) as sock:
        sock.sendall(raw)
        return read_answer(sock)
