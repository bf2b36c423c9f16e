"""`python -m bench --door`: how the server's front doors hold up against slow and hostile clients.

    python -m bench --door --json door.json        # tiny random-weight model, a few minutes on 2 cores
    python -m bench --door --door-seconds 60       # the slow clients held a minute
    python -m bench --door --smoke                 # seconds, tiny sizes (tests/test_bench.py)

Starts `python -m server` with every flag at its default but the model and the
ports (gRPC, HTTP and metrics on 127.0.0.1, picked free), and runs, one after
another (the clients: bench/door_clients.py):

- slow: from 127.0.0.2, `--slow-uploads` `POST /v1/embed` uploads that declare
  100,000 bytes of JSON and send a byte every 2 s, and `--half-sent`
  connections that never end their headers (half send 64 KB of `X-Pad-N`
  lines over `--door-seconds`, half a request line only). Meanwhile, for
  `--door-seconds`, a caller on 127.0.0.1 starts an HTTP JSON and a gRPC
  `Embed` call of one small PNG every 0.5 s each (10 s timeout). Reported:
  those calls' outcomes and latency; when the server closed each kind of
  hostile connection and what it sent them; its open file descriptors before,
  during (the most) and after;
- json64: a `--json-mb` MB JSON body of the wrong shape, `[[],[],...]`, then
  `{"images": [[],[],...]}`, then a well-formed job of twice the size (31 base64
  strings of random bytes), each sent once while a thread polls `GET /health`
  every 10 ms on a keep-alive connection: each body's status and message, the
  server process's peak RSS (VmHWM) above its RSS before the body, and the
  slowest and p99 `/health` answer while the body was handled;
- grpc32: `--grpc-calls` concurrent `Embed` calls of `--grpc-images` ~8.5 MB
  noise PNGs each, while threads poll gRPC health and `GET /health` every
  10 ms: the calls' outcomes, the slowest and p99 health answer of each kind,
  the peak RSS (decode workers' added) and the RSS `--settle-s` (30) s after.

No speed is asserted: the numbers are what this machine showed under its load
(the load average at start and end is in the result).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import aiohttp
import grpc
import torch

from bench import machine
from bench.door_clients import (
    ATTACKER,
    CALL_TIMEOUT_S,
    KINDS,
    PAD_LINES,
    GrpcHealth,
    HttpHealth,
    Poller,
    calls_report,
    error_message,
    fates,
    hostile,
    victim,
)
from bench.images import gray_png, noise_png
from bench.overload import die_with_parent
from bench.server_proc import ServerProcess, status_kb
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc

VICTIM_EVERY_S = 0.5
POLL_EVERY_S = 0.01
BODY_TIMEOUT_S = 120.0  # a json64 body's socket operations
BIG_CALL_TIMEOUT_S = 300.0  # a grpc32 call's deadline
_SETTLE_S = 1.0  # the server idle before each measurement
_BIG = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}  # an image error's number -> its name


def run(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    info = machine.describe(torch.device("cpu"))
    flags = ["--model", model_dir, "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0",
             *args.server_arg]  # fmt: skip
    log(f"{info['cpu']}, load {info['load_average_start']}")
    config = {"size": args.model or args.size, "door_seconds": args.door_seconds, "slow_uploads": args.slow_uploads,
              "half_sent": args.half_sent, "json_mb": args.json_mb, "grpc_calls": args.grpc_calls,
              "grpc_images": args.grpc_images, "settle_s": args.settle_s, "server_args": flags,
              "smoke": args.smoke}  # fmt: skip
    result: dict[str, Any] = {"machine": info, "config": config}
    with ServerProcess(flags) as server:
        result["slow"] = asyncio.run(slow(server, args))
        log(f"slow: {table_slow(result['slow'])}")
        result["json64"] = json64(server, args.json_mb)
        log(f"json64: {table_json64(result['json64'])}")
        result["grpc32"] = grpc32(server, args)
        log(f"grpc32: {table_grpc32(result['grpc32'])}")
        result["server_log"] = server.lines[:4]
    result["machine"]["load_average_end"] = machine.load_average()
    return result


async def slow(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """Slow uploads and half-sent requests from ATTACKER held open while a victim calls both doors."""
    assert server.http_port is not None
    fds_before = server.open_fds()
    stop = asyncio.Event()
    kinds = ["slow upload"] * args.slow_uploads + ["header pad"] * (args.half_sent // 2)
    kinds += ["request line"] * (args.half_sent - args.half_sent // 2)
    pad_every_s = args.door_seconds / PAD_LINES
    opened = time.monotonic()
    attacks = [asyncio.create_task(hostile(kind, server.http_port, stop, pad_every_s)) for kind in kinds]
    await asyncio.sleep(1.0)  # connected, and their first bytes sent
    sampling = asyncio.create_task(_sample_fds(server, stop))
    calls = await _victims(server, args.door_seconds)
    stop.set()
    records = await asyncio.gather(*attacks)
    held_s = time.monotonic() - opened
    fds_during = await sampling
    await asyncio.sleep(2.0)  # the server sees the hang-ups
    fds = {"before": fds_before, "during_max": max(fds_during), "during": fds_during, "after": server.open_fds()}
    return {
        "attacker": ATTACKER,
        "held_s": held_s,
        "victim": calls,
        "hostile": {kind: fates(records, kind) for kind in KINDS},
        "server_fds": fds,
    }


async def _sample_fds(server: ServerProcess, stop: asyncio.Event) -> list[int]:
    samples = []
    while not stop.is_set():
        samples.append(server.open_fds())
        await asyncio.sleep(0.5)
    return samples


async def _victims(server: ServerProcess, seconds: float) -> dict[str, Any]:
    """A caller on 127.0.0.1 that starts an HTTP JSON and a gRPC `Embed` call of one small PNG every 0.5 s each."""
    png = gray_png(0)
    body = json.dumps({"image": base64.b64encode(png).decode()}).encode()
    url = f"http://127.0.0.1:{server.http_port}/v1/embed"
    request = pb.EmbedRequest(images=[pb.Image(data=png)])
    # aiohttp rounds a timeout of ceil_threshold (5 s) or more up to a whole second of the loop's clock: not here
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S, ceil_threshold=2 * CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session, grpc.aio.insecure_channel(server.address) as ch:
        stub = embed_pb2_grpc.EmbedStub(ch)

        async def http_call() -> tuple[str, str]:
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                    text = await response.text()
            except TimeoutError:
                return "timeout", ""
            except aiohttp.ClientError as exc:
                return type(exc).__name__, str(exc)[:160]
            if response.status == 200:
                return "OK", ""
            return f"HTTP {response.status}", error_message(text)

        async def grpc_call() -> tuple[str, str]:
            try:
                answer = await stub.Embed(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, (exc.details() or "")[:160]
            error = answer.embeddings[0].error
            return ("OK", "") if not error.code else (f"image {_CODE_NAMES[error.code]}", error.message)

        http_calls, grpc_calls = await asyncio.gather(
            victim(http_call, seconds, VICTIM_EVERY_S), victim(grpc_call, seconds, VICTIM_EVERY_S)
        )
    return {"HTTP POST /v1/embed": calls_report(http_calls), "gRPC Embed": calls_report(grpc_calls)}


def wrong_shapes(megabytes: float) -> Iterator[tuple[str, bytes]]:
    """JSON bodies of about `megabytes` MB that parse into millions of empty lists: a list, and a job's images;
    then a well-formed job of twice the size (31 base64 strings of random bytes: parsed whole, each image
    then refused by its decoder), the largest body a parse must get through."""
    count = int(megabytes * 2**20) // 3
    yield "[[],[],...]", b"[" + b"[]," * count + b"[]]"
    yield '{"images": [[],[],...]}', b'{"images": [' + b"[]," * count + b"[]]}"
    text = base64.b64encode(random.Random(0).randbytes(int(2 * megabytes * 2**20 * 0.95 * 3 / 4 / 31)))
    yield '{"images": [31 x base64]}', b'{"images": ["' + b'", "'.join([text] * 31) + b'"]}'


def json64(server: ServerProcess, megabytes: float) -> dict[str, Any]:
    """Each wrong-shaped JSON body sent once while /health is polled: the answer, the memory, the stall."""
    assert server.http_port is not None
    with Poller(HttpHealth(server.http_port), POLL_EVERY_S) as health:
        return {name: _one_body(server, health, body) for name, body in wrong_shapes(megabytes)}


def _one_body(server: ServerProcess, health: Poller, body: bytes) -> dict[str, Any]:
    time.sleep(_SETTLE_S)
    idle_kb = status_kb(server.pid, "VmRSS")
    reset = server.reset_peak_rss()
    started = time.monotonic()
    status, message = _post_json(server, body)
    seconds = time.monotonic() - started
    peak_kb = status_kb(server.pid, "VmHWM")
    return {
        "bytes": len(body),
        "status": status,
        "message": message,
        "seconds": seconds,
        "idle_rss_mb": idle_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "peak_above_idle_mb": (peak_kb - idle_kb) / 1024,
        "peak_since": "reset before this body" if reset else "server start (VmHWM is a lifetime peak)",
        "health": health.during(started, started + seconds),
    }


def _post_json(server: ServerProcess, body: bytes) -> tuple[str, str]:
    """`POST /v1/embed` of `body` with its Content-Length: the status (or the error) and the answer's message."""
    assert server.http_port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=BODY_TIMEOUT_S)
    try:
        connection.request("POST", "/v1/embed", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return str(response.status), error_message(response.read())
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, str(exc)[:160]
    finally:
        connection.close()


def grpc32(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """Concurrent `Embed` calls of large noise PNGs while both health endpoints are polled.

    The calls are made by a process of their own: sending 4 GB from the pollers' process made its
    threads wait for its GIL, a delay that is the client's, not the server's."""
    assert server.http_port is not None
    time.sleep(_SETTLE_S)
    idle = server.rss_bytes()
    reset = server.reset_peak_rss()
    spawn = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(1, mp_context=spawn, initializer=die_with_parent) as caller,
        Poller(GrpcHealth(server.address), POLL_EVERY_S) as grpc_health,
        Poller(HttpHealth(server.http_port), POLL_EVERY_S) as http_health,
    ):
        calls = caller.submit(_big_calls, server.address, args.grpc_calls, args.grpc_images)
        png_bytes, request_bytes, outcomes, started, ended = calls.result()
        health = {"gRPC Health/Check": grpc_health.during(started, ended),
                  "HTTP GET /health": http_health.during(started, ended)}  # fmt: skip
    peak = server.peak_rss_bytes()
    time.sleep(args.settle_s)
    messages: dict[str, str] = {}
    seconds_by_outcome: dict[str, list[float]] = {}
    for outcome, seconds, message in sorted(outcomes, key=lambda o: o[1]):
        seconds_by_outcome.setdefault(outcome, []).append(round(seconds, 3))
        if outcome != "OK":
            messages.setdefault(outcome, message)
    return {
        "png_bytes": png_bytes,
        "request_bytes": request_bytes,
        "outcomes": dict(Counter(outcome for outcome, _, _ in outcomes)),
        "messages": messages,
        "call_seconds": seconds_by_outcome,
        "slowest_call_s": max(seconds for _, seconds, _ in outcomes),
        "seconds": ended - started,
        "health": health,
        "idle_rss_mb": idle / 2**20,
        "peak_rss_mb": peak / 2**20,
        "peak_since": "reset before the calls" if reset else "server start (VmHWM is a lifetime peak)",
        "rss_after_mb": server.rss_bytes() / 2**20,
        "after_s": args.settle_s,
    }


def _big_calls(address: str, calls: int, images: int) -> tuple[int, int, list[tuple[str, float, str]], float, float]:
    """`calls` concurrent calls of `images` noise PNGs each: the PNG's and a request's size, each call's outcome,
    and when the calls began and ended (`time.monotonic()`, the same clock in every process)."""
    png = noise_png()
    raw = pb.EmbedRequest(images=[pb.Image(data=png, id=str(i)) for i in range(images)]).SerializeToString()
    with grpc.insecure_channel(address, options=_BIG) as channel:
        call = channel.unary_unary("/dinov2.v1.Embed/Embed", request_serializer=None,
                                   response_deserializer=pb.EmbedResponse.FromString)  # fmt: skip  # bytes sent as is
        started = time.monotonic()
        with ThreadPoolExecutor(calls) as pool:
            outcomes = list(pool.map(lambda _: _big_call(call, raw), range(calls)))
        return len(png), len(raw), outcomes, started, time.monotonic()


def _big_call(call: Callable[..., pb.EmbedResponse], raw: bytes) -> tuple[str, float, str]:
    """One call's outcome, seconds, and message (the status's details, or the first failed image's message)."""
    started = time.monotonic()
    try:
        response = call(raw, timeout=BIG_CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code().name, time.monotonic() - started, (exc.details() or "")[:160]
    failed = [e.error for e in response.embeddings if e.error.code]
    if not failed:
        return "OK", time.monotonic() - started, ""
    codes = "/".join(sorted({_CODE_NAMES[error.code] for error in failed}))
    return f"images {codes}", time.monotonic() - started, failed[0].message[:160]


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _spread(spread_: dict[str, Any]) -> str:
    if not spread_["count"]:
        return "-"
    return f"{_s(spread_['min_s'])} / {_s(spread_['p50_s'])} / {_s(spread_['max_s'])} (min / median / max)"


def _said(answer: str) -> str:
    """The body of an HTTP answer kept whole (its headers dropped), on one line."""
    return answer.split("\r\n\r\n", 1)[-1].replace("\r\n", " ")[:160]


def _health(health: dict[str, Any]) -> str:
    """A poller's checks during a span: how many, outcomes, p99, slowest and when it began."""
    started = health["slowest_started_s"]
    when = "" if started is None else f" (began {started:.1f} s in)"
    return (f"{health['checks']} checks {health['outcomes']}, p99 {_s(health['p99_s'])}, slowest "
            f"{_s(health['max_s'])}{when}")  # fmt: skip


def table_slow(slow_: dict[str, Any]) -> str:
    lines = [f"held {slow_['held_s']:.0f} s from {slow_['attacker']}"]
    for name, calls in slow_["victim"].items():
        latency = calls["latency"]
        lines.append(f"  victim {name}: {latency['count']} calls {calls['outcomes']}; latency p50 "
                     f"{_s(latency['p50_s'])}, max {_s(latency['max_s'])}")  # fmt: skip
        lines += [f"      {outcome}: {message}" for outcome, message in calls["messages"].items() if message]
    for kind, fate in slow_["hostile"].items():
        answered, closed = fate["answered_after"], fate["closed_after"]
        statuses = {line: answer["count"] for line, answer in fate["answered"].items()} or 0
        ended = f" {fate['ended']}" if fate["ended"] else ""
        lines += [
            f"  {fate['connections']} {kind}: refused at connect {fate['refused_at_connect'] or 0}, answered "
            f"{statuses} after {_spread(answered)}; closed by the server {closed['count']}{ended} after "
            f"{_spread(closed)}; {fate['still_open']} still open at the end",
            *(f"      {line}: {_said(answer['example'])}" for line, answer in fate["answered"].items()),
        ]
    fds = slow_["server_fds"]
    lines.append(f"  server open fds: {fds['before']} before, {fds['during_max']} at most during, {fds['after']} after")
    return "\n".join(lines)


def table_json64(bodies: dict[str, Any]) -> str:
    lines = []
    for name, body in bodies.items():
        health = body["health"]
        lines.append(f"  {name} ({body['bytes'] / 2**20:.0f} MB): {body['status']} in {body['seconds']:.2f} s "
                     f"({body['message'][:100]!r}); peak RSS {body['peak_rss_mb']:.0f} MB, "
                     f"{body['peak_above_idle_mb']:+.0f} MB over {body['idle_rss_mb']:.0f} MB before "
                     f"(peak since {body['peak_since']}); /health {_health(health)}")  # fmt: skip
    return "\n".join(lines)


def table_grpc32(calls: dict[str, Any]) -> str:
    lines = [f"  outcomes {calls['outcomes']} in {calls['seconds']:.1f} s, slowest {calls['slowest_call_s']:.1f} s"]
    lines += [f"      {outcome} after {seconds[0]:.1f} s to {seconds[-1]:.1f} s"
              for outcome, seconds in calls["call_seconds"].items()]  # fmt: skip
    lines += [f"      {outcome}: {message}" for outcome, message in calls["messages"].items()]
    lines += [f"  {name}: {_health(health)}" for name, health in calls["health"].items()]
    lines.append(f"  server RSS {calls['idle_rss_mb']:.0f} MB before, peak {calls['peak_rss_mb']:.0f} MB (decode "
                 f"workers' added, since {calls['peak_since']}), {calls['rss_after_mb']:.0f} MB {calls['after_s']:g} s "
                 "after")  # fmt: skip
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    grpc_ = result["grpc32"]
    return "\n".join([
        f"front doors against slow and hostile clients: dinov2-{c['size']} on {m['cpu']} ({m['cpus']} CPUs), load "
        f"average {m['load_average_start']} at start, {m['load_average_end']} at end",
        f"slow: {c['slow_uploads']} uploads at a byte every 2 s and {c['half_sent']} half-sent requests; a victim "
        f"call of one small PNG every {VICTIM_EVERY_S} s per door for {c['door_seconds']:g} s",
        table_slow(result["slow"]),
        f"json64: {c['json_mb']:g} MB bodies of the wrong shape and a well-formed one of nearly twice that, "
        f"/health polled every {POLL_EVERY_S * 1000:.0f} ms",
        table_json64(result["json64"]),
        f"grpc32: {c['grpc_calls']} concurrent Embed calls of {c['grpc_images']} x "
        f"{grpc_['png_bytes'] / 1e6:.1f} MB noise PNGs ({grpc_['request_bytes'] / 1e6:.0f} MB a call)",
        table_grpc32(grpc_),
    ])  # fmt: skip


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
