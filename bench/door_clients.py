"""The clients of `python -m bench --door` (bench/door.py): hostile raw sockets, a victim's calls, health pollers.

Hostile connections come from 127.0.0.2 (Linux routes all of 127/8 to
loopback: a second caller address without IPv6) and never finish their
request; the victim and the pollers call from 127.0.0.1. Every wait has a
timeout, so that a server that stops answering ends the run, late.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loopback import SECOND_CALLER

ATTACKER = SECOND_CALLER
"""A second caller's address on one machine: the server sees it as another peer (bench/loopback.py)."""
CALL_TIMEOUT_S = 10.0  # a victim call's and a hostile connect's limit
PROBE_TIMEOUT_S = 30.0  # a health check's: long enough to time a stall, short enough to end the run
KINDS = ("slow upload", "header pad", "request line")
UPLOAD_DECLARED = 100_000  # a slow upload's Content-Length
UPLOAD_BYTE_EVERY_S = 2.0
PAD_LINES = 64  # "header pad" sends 64 lines of about 1000 bytes: 64 KB of headers, never the blank line
_PAD_LINE_BYTES = 1000
_ANSWER_KEPT = 300  # bytes kept of what the server sends a hostile connection


def spread(seconds: list[float]) -> dict[str, Any]:
    """How many durations, and their min, median, p99 and max (None where there are none)."""
    if not seconds:
        return {"count": 0, "min_s": None, "p50_s": None, "p99_s": None, "max_s": None}
    ordered = sorted(seconds)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {"count": len(ordered), "min_s": ordered[0], "p50_s": statistics.median(ordered), "p99_s": p99,
            "max_s": ordered[-1]}  # fmt: skip


def error_message(body: bytes | str) -> str:
    """An error answer's message (`{"error": {"message"}}`), else the start of the body; at most 160 characters."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        return str(json.loads(text)["error"]["message"])[:160]
    except (ValueError, KeyError, TypeError):
        return text[:160]


@dataclass
class Hostile:
    """One hostile connection's fate: refused at connect, or what the server sent it and when it hung up."""

    kind: str
    refused: str | None = None  # the connect's error
    answer: bytes = b""  # the first bytes the server sent
    answered_after_s: float | None = None  # from the connect's start to the first of them
    ended: str | None = None  # "EOF" or "reset": the server closed the connection
    closed_after_s: float | None = None  # from the connect's start to the EOF or reset


async def hostile(kind: str, port: int, stop: asyncio.Event, pad_every_s: float) -> Hostile:
    """A connection from ATTACKER that sends `kind`'s bytes at its pace until the server hangs up or `stop`."""
    record = Hostile(kind)
    started = time.monotonic()
    connect = asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
    try:
        reader, writer = await asyncio.wait_for(connect, CALL_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        record.refused = type(exc).__name__
        return record
    tasks = [
        asyncio.create_task(_listen(reader, record, started)),
        asyncio.create_task(stop.wait()),
        asyncio.create_task(_send(kind, writer, pad_every_s)),
    ]
    try:
        await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        writer.transport.abort()
    return record


async def _send(kind: str, writer: asyncio.StreamWriter, pad_every_s: float) -> None:
    """Sends `kind`'s request at its pace, never its end; returns when the server hung up."""
    try:
        if kind == "slow upload":
            writer.write(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % UPLOAD_DECLARED)  # fmt: skip
            for _ in range(UPLOAD_DECLARED - 1):  # never the last byte
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(UPLOAD_BYTE_EVERY_S)
        elif kind == "header pad":
            writer.write(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for number in range(PAD_LINES):
                name = f"X-Pad-{number}: ".encode()
                writer.write(name + b"a" * (_PAD_LINE_BYTES - len(name) - 2) + b"\r\n")
                await writer.drain()
                await asyncio.sleep(pad_every_s)
        else:
            writer.write(b"POST /v1/embed HTTP/1.1\r\n")
            await writer.drain()
    except ConnectionError:
        return


async def _listen(reader: asyncio.StreamReader, record: Hostile, started: float) -> None:
    """Reads what the server sends until it hangs up; keeps the start of it and the time of the hang-up."""
    try:
        while chunk := await reader.read(65536):
            if record.answered_after_s is None:
                record.answered_after_s = time.monotonic() - started
            record.answer += chunk[: _ANSWER_KEPT - len(record.answer)]
        record.ended = "EOF"
    except ConnectionError:
        record.ended = "reset"
    record.closed_after_s = time.monotonic() - started


def fates(records: list[Hostile], kind: str) -> dict[str, Any]:
    """What happened to the hostile connections of one kind: refused, answered (status lines), closed and when."""
    mine = [r for r in records if r.kind == kind]
    closed = [r.closed_after_s for r in mine if r.closed_after_s is not None]
    answers: dict[str, dict[str, Any]] = {}
    for record in mine:
        if record.answer:
            line = record.answer.split(b"\r\n", 1)[0].decode("latin-1")[:80]
            answer = answers.setdefault(line, {"count": 0, "example": record.answer.decode("latin-1")})
            answer["count"] += 1
    refused = Counter(r.refused for r in mine if r.refused)
    return {
        "connections": len(mine),
        "refused_at_connect": dict(refused),
        "answered": answers,
        "answered_after": spread([r.answered_after_s for r in mine if r.answered_after_s is not None]),
        "ended": dict(Counter(r.ended for r in mine if r.ended)),
        "closed_after": spread(closed),
        "still_open": len(mine) - len(closed) - sum(refused.values()),
    }


@dataclass(frozen=True)
class Call:
    """One victim call: when it started (s from the victim's start), how long it took, and its outcome."""

    started_s: float
    seconds: float
    outcome: str  # "OK", "HTTP <status> <code>", a gRPC status name, or "timeout"
    message: str = ""


async def victim(call: Callable[[], Awaitable[tuple[str, str]]], seconds: float, every_s: float) -> list[Call]:
    """Starts `call` every `every_s` for `seconds`, whether or not the last was answered (a steady arrival
    rate, so that a stall shows in every call it delays); each one's latency and outcome."""
    started = time.monotonic()

    async def timed() -> Call:
        begun = time.monotonic()
        outcome, message = await call()
        return Call(begun - started, time.monotonic() - begun, outcome, message)

    tasks = []
    for number in range(max(1, round(seconds / every_s))):
        await asyncio.sleep(max(0.0, started + number * every_s - time.monotonic()))
        tasks.append(asyncio.create_task(timed()))
    return list(await asyncio.gather(*tasks))


def calls_report(calls: list[Call]) -> dict[str, Any]:
    """A victim's calls: outcomes counted, latency spread, one message per refusal, and every call."""
    messages: dict[str, str] = {}
    for call in calls:
        if call.outcome != "OK":
            messages.setdefault(call.outcome, call.message)
    return {
        "outcomes": dict(Counter(call.outcome for call in calls)),
        "latency": spread([call.seconds for call in calls]),
        "messages": messages,
        "calls": [[round(c.started_s, 3), round(c.seconds, 4), c.outcome] for c in calls],
    }


class Probe(Protocol):
    """A health check: its outcome's name (raises on a broken connection); `close` frees its connection."""

    def __call__(self) -> str: ...

    def close(self) -> None: ...


class HttpHealth:
    """`GET /health` on one keep-alive connection from 127.0.0.1, opened again after an error."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._connection: http.client.HTTPConnection | None = None

    def __call__(self) -> str:
        if self._connection is None:
            self._connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=PROBE_TIMEOUT_S)
        try:
            self._connection.request("GET", "/health")
            response = self._connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        return str(response.status)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class GrpcHealth:
    """`grpc.health.v1.Health/Check` on one channel."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)

    def __call__(self) -> str:
        try:
            answer = self._stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def close(self) -> None:
        self._channel.close()


class Poller:
    """`with Poller(probe, every_s):` a daemon thread that starts `probe` every `every_s` (at once when one was
    late) and keeps each check's (start, end, outcome); `during` reports the checks of a span of time."""

    def __init__(self, probe: Probe, every_s: float) -> None:
        self.checks: list[tuple[float, float, str]] = []
        self._probe = probe
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="door-poller", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * PROBE_TIMEOUT_S)
        self._probe.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                outcome = self._probe()
            except Exception as exc:  # a broken connection is an outcome, and the next check opens another
                outcome = type(exc).__name__
            self.checks.append((started, time.monotonic(), outcome))
            self._stop.wait(max(0.0, started + self._every_s - time.monotonic()))

    def during(self, start: float, end: float) -> dict[str, Any]:
        """The checks that overlapped [start, end] (after waiting for the one in progress at `end`): how many,
        their outcomes, their latency's p99 and max, and when the slowest began (s after `start`)."""
        deadline = time.monotonic() + 2 * PROBE_TIMEOUT_S
        while not (self.checks and self.checks[-1][0] > end) and time.monotonic() < deadline:
            time.sleep(self._every_s)
        mine = [check for check in self.checks if check[0] <= end and check[1] >= start]
        latency = spread([stop - begun for begun, stop, _ in mine])
        slowest = max(mine, key=lambda check: check[1] - check[0], default=None)
        return {"checks": len(mine), "outcomes": dict(Counter(o for _, _, o in mine)), "p99_s": latency["p99_s"],
                "max_s": latency["max_s"],
                "slowest_started_s": None if slowest is None else slowest[0] - start}  # fmt: skip
