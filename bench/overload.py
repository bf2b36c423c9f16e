"""`python -m bench --overload`: backpressure against a slow model, the way users meet it.

    python -m bench --overload --size base --dtype float32            # dinov2-base-shaped, on this CPU
    python -m bench --overload --size base --dtype float32 --busy-loops 2

Starts `python -m server` (every flag at its default but the model, dtype and
ports) and runs, one after another:

- bulk: `python -m client embed PHOTOS --server ... -o out.npy` with every flag
  at its default, on `--photos` distinct 512x512 JPEGs: exit status, rows,
  seconds, and the lines it printed about a busy server;
- burst: `--burst-calls` concurrent unary `Embed` calls of 32 images with a
  60 s deadline: how many were answered, refused (and how fast), or accepted
  and then expired;
- idle streams: one caller (127.0.0.1) opens `--idle-streams` streams and
  sends nothing; another (127.0.0.2, through bench/loopback.py's relay) makes
  an `Embed` call, and health checks go from both addresses: their outcomes
  and the slowest health check;

and the server's peak RSS (its decode workers' added) and its RSS after.
`--busy-loops N` runs N busy-loop processes beside all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import machine
from bench.images import gray_jpegs
from bench.loopback import Relay
from bench.server_proc import REPO, ServerProcess
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc

_PR_SET_PDEATHSIG = 1
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def die_with_parent() -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def busy_loops(count: int) -> list[subprocess.Popen[bytes]]:
    """`count` processes that spin on a CPU each, ended with this one at the latest."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=die_with_parent) for _ in range(count)
    ]


def bulk(address: str, photos: Path, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "client", "embed", str(photos), "--server", address, "-o", str(out)],
        cwd=REPO, capture_output=True, text=True, check=False, preexec_fn=die_with_parent,
    )  # fmt: skip
    seconds = time.monotonic() - started
    rows = int(np.load(out).shape[0]) if out.exists() else 0
    lines = done.stderr.splitlines()
    said = [line for line in lines if "busy" in line or "keeps up" in line or "error" in line or "waiting" in line]
    return {"exit": done.returncode, "rows": rows, "seconds": seconds, "said": said[:10], "last": lines[-2:]}


def burst(address: str, datas: list[bytes], calls: int, images: int, deadline_s: float) -> dict[str, Any]:
    request = pb.EmbedRequest(images=[pb.Image(data=datas[i % len(datas)], id=str(i)) for i in range(images)])
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20)])
    stub = embed_pb2_grpc.EmbedStub(channel)

    def one(_: int) -> tuple[str, float]:
        started = time.monotonic()
        try:
            response = stub.Embed(request, timeout=deadline_s)
        except grpc.RpcError as exc:
            code = exc.code()
            return ("expired" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name), time.monotonic() - started
        late = sum(1 for item in response.embeddings if item.error.code == _DEADLINE_EXCEEDED)
        return ("expired" if late else "OK"), time.monotonic() - started

    with ThreadPoolExecutor(calls) as pool:
        outcomes = list(pool.map(one, range(calls)))
    channel.close()
    refusals = sorted(seconds for outcome, seconds in outcomes if outcome == "RESOURCE_EXHAUSTED")
    answered = sorted(seconds for outcome, seconds in outcomes if outcome == "OK")
    return {
        "outcomes": dict(Counter(outcome for outcome, _ in outcomes)),
        "refusal_median_s": statistics.median(refusals) if refusals else None,
        "refusal_max_s": refusals[-1] if refusals else None,
        "answered_max_s": answered[-1] if answered else None,
    }


async def _idle_streams(port: int, streams: int, health_checks: int, datas: list[bytes]) -> dict[str, Any]:
    relay = Relay(port)  # the other caller calls from 127.0.0.2
    flooder = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    other = grpc.aio.insecure_channel(await relay.start())
    calls = [embed_pb2_grpc.EmbedStub(flooder).EmbedStream() for _ in range(streams)]
    settled_at = time.monotonic() + 60
    while time.monotonic() < settled_at and sum(call.done() for call in calls) < streams - 1:
        await asyncio.sleep(0.1)  # the refusals arrive; the streams the server took stay open
        if all(call.done() for call in calls[-10:]):
            break
    refused = Counter([(await call.code()).name for call in calls if call.done()])
    request = pb.EmbedRequest(images=[pb.Image(data=datas[0])])
    embed_started = time.monotonic()
    try:
        answer = await embed_pb2_grpc.EmbedStub(other).Embed(request, timeout=120)
        embed = "OK" if answer.embeddings[0].values else "empty"
    except grpc.aio.AioRpcError as exc:
        embed = exc.code().name
    embed_s = time.monotonic() - embed_started
    checks: list[tuple[str, float]] = []
    for number in range(health_checks):
        channel = (other, flooder)[number % 2]
        started = time.monotonic()
        try:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name
        checks.append((outcome, time.monotonic() - started))
    await flooder.close()
    await other.close()
    await relay.close()
    return {
        "streams": streams,
        "refused": dict(refused),
        "open": streams - sum(refused.values()),
        "other_embed": embed,
        "other_embed_s": embed_s,
        "health": dict(Counter(outcome for outcome, _ in checks)),
        "health_max_s": max(seconds for _, seconds in checks),
    }


def run(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    loops = busy_loops(args.busy_loops)
    try:
        return _measure(args, model_dir)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def _measure(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    info = machine.describe(torch.device("cpu"))
    datas = gray_jpegs(args.photos)
    server_args = ["--model", model_dir, "--dtype", args.dtype, "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", *args.server_arg]  # fmt: skip
    config = {"model": model_dir, "dtype": args.dtype, "photos": args.photos, "busy_loops": args.busy_loops,
              "server_args": server_args}  # fmt: skip
    result: dict[str, Any] = {"machine": info, "config": config}
    with tempfile.TemporaryDirectory(prefix="dinov2-overload-") as tmp, ServerProcess(server_args) as server:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for index, data in enumerate(datas):
            (photos / f"{index:04d}.jpg").write_bytes(data)
        result["bulk"] = bulk(server.address, photos, Path(tmp) / "out.npy")
        print(f"[bench] bulk: {result['bulk']}", file=sys.stderr, flush=True)
        result["burst"] = burst(server.address, datas, args.burst_calls, 32, 60.0)
        print(f"[bench] burst: {result['burst']}", file=sys.stderr, flush=True)
        result["idle_streams"] = asyncio.run(_idle_streams(server.port, args.idle_streams, 45, datas))  # type: ignore[arg-type]
        print(f"[bench] idle streams: {result['idle_streams']}", file=sys.stderr, flush=True)
        result["peak_rss_mb"] = server.peak_rss_bytes() / 2**20
        time.sleep(args.settle_s)  # the idle trims run 1, 4 and 16 s after the last work
        result["rss_after_mb"] = server.rss_bytes() / 2**20
    result["machine"]["load_average_end"] = machine.load_average()
    return result


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def table(result: dict[str, Any]) -> str:
    bulk_, burst_, idle = result["bulk"], result["burst"], result["idle_streams"]
    config = result["config"]
    lines = [
        f"{result['machine']['cpu']}, {config['dtype']}, {config['busy_loops']} busy loops beside it, "
        f"load {result['machine']['load_average_start']} -> {result['machine']['load_average_end']}",
        f"bulk client, default flags, {config['photos']} JPEGs: exit {bulk_['exit']}, {bulk_['rows']} rows in "
        f"{bulk_['seconds']:.0f} s",
        *(f"    {line}" for line in bulk_["said"] + bulk_["last"]),
        f"burst of unary calls (32 images, 60 s deadline): {burst_['outcomes']}; refusals answered in "
        f"{_seconds(burst_['refusal_median_s'])} median, {_seconds(burst_['refusal_max_s'])} max; slowest answer "
        f"{_seconds(burst_['answered_max_s'])}",
        f"{idle['streams']} idle streams from one caller: {idle['refused']} refused, {idle['open']} open; another "
        f"caller's Embed {idle['other_embed']} in {idle['other_embed_s']:.2f} s; health {idle['health']}, slowest "
        f"{idle['health_max_s']:.3f} s",
        f"server peak RSS {result['peak_rss_mb']:.0f} MB, {result['rss_after_mb']:.0f} MB after",
    ]
    return "\n".join(lines)
