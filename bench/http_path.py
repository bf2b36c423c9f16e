"""`python -m bench --http`: HTTP `POST /v1/embed` against gRPC `Embed`, on one server, in the same run.

    python -m bench --http --size small --dtype float32
    python -m bench --http --size null                   # the host path alone (a GPU's host): the transports' cost
    python -m bench --http --smoke                       # seconds, tiny model (tests/test_bench.py)

One `python -m server` listens on both ports. On the same generated 512x512
grayscale JPEGs, `--request-images` (32) to a request and `--window` (4)
requests in flight, the rounds alternate three paths:

- gRPC: unary `Embed` calls (grpc.aio);
- HTTP JSON: `POST /v1/embed` of `{"images": [<base64>, ...]}`;
- HTTP multipart: `POST /v1/embed` of a form with one `images` file part per JPEG;

and each path's best round counts (a burst of someone else's load then lowers
one round, not one path). On a shared machine images/s still swing with the
load; the ratio of gRPC's server CPU per image to HTTP's is a second view:
the throughput ratio a host that the CPU limits would see. Request bodies are built once, before timing, as a
client that has its files in memory would send them. Beside images/s, the
server's CPU per image (all its processes, and its event loop alone, where
HTTP parses bodies and writes JSON) says what each transport costs the host.
The target (the HTTP issue): HTTP within 10% of `Embed`'s throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import numpy as np

from bench import machine
from bench.images import gray_jpegs
from bench.server_proc import ServerProcess, thread_cpu_seconds
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc
from server.model import resolve_device

PATHS = ("gRPC Embed", "HTTP JSON", "HTTP multipart")
TARGET = 0.9
_MAX_MESSAGE = 256 * 1024 * 1024


@dataclass(frozen=True)
class HttpBody:
    """A request body built once: its bytes and its Content-Type."""

    data: bytes
    content_type: str


def json_body(datas: list[bytes]) -> HttpBody:
    images = [base64.b64encode(data).decode() for data in datas]
    return HttpBody(json.dumps({"images": images}).encode(), "application/json")


def multipart_body(datas: list[bytes]) -> HttpBody:
    """A multipart/form-data body as `curl -F images=@a.jpg -F images=@b.jpg ...` sends it."""
    boundary = uuid.uuid4().hex
    chunks = []
    for index, data in enumerate(datas):
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{index}.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n")  # fmt: skip
        chunks += [head.encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return HttpBody(b"".join(chunks), f"multipart/form-data; boundary={boundary}")


class Clients:
    """One gRPC channel and one HTTP session to the server, and the three paths over them."""

    def __init__(self, server: ServerProcess, requests: list[list[bytes]]) -> None:
        options = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]
        self._channel = grpc.aio.insecure_channel(server.address, options=options)
        self._stub = embed_pb2_grpc.EmbedStub(self._channel)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._url = f"http://127.0.0.1:{server.http_port}/v1/embed"
        self._grpc = [pb.EmbedRequest(images=[pb.Image(data=data) for data in datas]) for datas in requests]
        self._bodies = {
            "HTTP JSON": [json_body(datas) for datas in requests],
            "HTTP multipart": [multipart_body(datas) for datas in requests],
        }

    async def close(self) -> None:
        await self._session.close()
        await self._channel.close()

    async def one(self, path: str, index: int) -> list[np.ndarray]:
        """Request `index` (cycled) over `path`: its embeddings; any error fails the run."""
        if path == "gRPC Embed":
            response = await self._stub.Embed(self._grpc[index % len(self._grpc)], timeout=3600)
            for item in response.embeddings:
                if item.HasField("error"):
                    raise RuntimeError(f"gRPC image failed: {item.error.message}")
            return [np.asarray(item.values, dtype=np.float32) for item in response.embeddings]
        bodies = self._bodies[path]
        body = bodies[index % len(bodies)]
        async with self._session.post(self._url, data=body.data, headers={"Content-Type": body.content_type}) as r:
            answer = await r.json()
        if r.status != 200 or answer["errors"]:
            raise RuntimeError(f"{path} failed: {r.status} {answer}")
        return [np.asarray(values, dtype=np.float32) for values in answer["embeddings"]]

    async def run(self, path: str, count: int, window: int) -> float:
        """`count` requests over `path`, `window` in flight; seconds from the first sent to the last answered."""
        next_index = iter(range(count))

        async def caller() -> None:
            for index in next_index:
                await self.one(path, index)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(window)))
        return time.perf_counter() - started


def run(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    device = str(resolve_device(args.device))
    info = machine.describe(resolve_device(args.device))
    datas = gray_jpegs(args.distinct_images)
    per_request = args.request_images
    requests = [[datas[(r * per_request + i) % len(datas)] for i in range(per_request)] for r in range(8)]
    flags = ["--model", model_dir, "--dtype", args.dtype, "--device", device, "--host", "127.0.0.1",
             "--port", "0", "--http-port", "0", "--metrics-port", "-1",
             "--max-queue-s", "3600", *args.server_arg]  # fmt: skip  # throughput, not admission
    log(f"{info['cpu']}, load {info['load_average_start']}; {per_request} JPEGs per request, window {args.window}")
    # The null model on one PyTorch thread, as a GPU's forward pass is issued from one: idle OpenMP threads
    # would spin after each op and take the CPU the host path (and the transports) needs (bench/host_path.py).
    null = (args.model is None and args.size == "null") and args.null_threads
    with ServerProcess(flags, env={"OMP_NUM_THREADS": str(args.null_threads)} if null else None) as server:
        result = asyncio.run(_measure(server, requests, args))
        result["server_log"] = server.lines[:4]
    result |= {"machine": info | {"load_average_end": machine.load_average()}}
    result["config"] = {
        "size": args.model or args.size, "dtype": args.dtype, "device": device, "request_images": per_request,
        "window": args.window, "rounds": args.rounds, "image": "512x512 grayscale JPEG, quality 90",
        "server_args": flags, "smoke": args.smoke, "null_model_threads": args.null_threads if null else None,
    }  # fmt: skip
    return result


async def _measure(server: ServerProcess, requests: list[list[bytes]], args: argparse.Namespace) -> dict[str, Any]:
    clients = Clients(server, requests)
    try:
        answers = {path: await clients.one(path, 0) for path in PATHS}
        identical = all(
            np.array_equal(a, b) for path in PATHS[1:] for a, b in zip(answers[PATHS[0]], answers[path], strict=True)
        )
        warm = await clients.run(PATHS[0], 2 * args.window, args.window)
        rate = 2 * args.window * args.request_images / warm
        count = max(2 * args.window, round(rate * args.service_seconds / args.request_images))
        if args.smoke:
            count = 2 * args.window
        rounds = []
        for number in range(args.rounds):
            measured: dict[str, Any] = {}
            for path in PATHS:
                before = thread_cpu_seconds(server.pid)
                seconds = await clients.run(path, count, args.window)
                images = count * args.request_images
                measured[path] = {"images_per_s": images / seconds, **_cpu(server.pid, before, images)}
            measured["load_average"] = machine.load_average()
            rounds.append(measured)
            log(f"round {number + 1}: " + ", ".join(f"{p} {measured[p]['images_per_s']:.2f}" for p in PATHS)
                + f" images/s, load {measured['load_average']}")  # fmt: skip
    finally:
        await clients.close()
    best = {path: max((r[path] for r in rounds), key=lambda m: m["images_per_s"]) for path in PATHS}
    grpc_rate = best[PATHS[0]]["images_per_s"]
    ratios = {path: best[path]["images_per_s"] / grpc_rate for path in PATHS[1:]}
    grpc_cpu = best[PATHS[0]]["server_cpu_ms_per_image"]
    cpu_ratios = {path: grpc_cpu / best[path]["server_cpu_ms_per_image"] for path in PATHS[1:]}
    return {
        "requests_per_round": count,
        "paths": best,
        "ratios_to_grpc": ratios,
        "cpu_ratios_to_grpc": cpu_ratios,
        "identical_embeddings": identical,
        "rounds": rounds,
        "target": {"value": round(ratios["HTTP JSON"], 4), "target": TARGET, "met": ratios["HTTP JSON"] >= TARGET},
    }


def _cpu(server_pid: int, before: dict[tuple[int, int, str], float], images: int) -> dict[str, float]:
    """The server's CPU milliseconds per image since `before`: all its processes, and its event loop thread."""
    after = thread_cpu_seconds(server_pid)
    used = {key: total - before.get(key, 0.0) for key, total in after.items()}
    loop = sum(cpu for (pid, tid, _), cpu in used.items() if pid == tid == server_pid)
    return {
        "server_cpu_ms_per_image": 1000 * sum(used.values()) / images,
        "event_loop_ms_per_image": 1000 * loop / images,
    }


def table(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    lines = [
        f"dinov2-{c['size']} {c['dtype']} on {m['cpu']} ({m['cpus']} CPUs), load average {m['load_average_start']} "
        f"at start, {m['load_average_end']} at end",
        f"{c['request_images']} JPEGs ({c['image']}) per request, {c['window']} requests in flight, "
        f"{result['requests_per_round']} requests per path per round, best of {c['rounds']} rounds",
        "",
        f"{'path':<18} {'images/s':>9} {'x gRPC':>7} {'server CPU ms/img':>18} {'event loop ms/img':>18} "
        f"{'x gRPC by CPU':>14}",
    ]
    for path, row in result["paths"].items():
        ratio = result["ratios_to_grpc"].get(path, 1.0)
        by_cpu = result["cpu_ratios_to_grpc"].get(path, 1.0)
        lines.append(f"{path:<18} {row['images_per_s']:>9.2f} {ratio:>7.3f} {row['server_cpu_ms_per_image']:>18.2f} "
                     f"{row['event_loop_ms_per_image']:>18.2f} {by_cpu:>14.3f}")  # fmt: skip
    lines += [
        "x gRPC by CPU: gRPC's server CPU per image over the path's, in each one's best round: the throughput "
        "ratio a host that the CPU limits would see",
        "rounds: " + "; ".join(" / ".join(f"{r[p]['images_per_s']:.1f}" for p in PATHS) for r in result["rounds"]),
        f"HTTP and gRPC embeddings identical: {result['identical_embeddings']}",
        f"[{'x' if result['target']['met'] else ' '}] HTTP JSON >= {TARGET} x gRPC Embed: {result['target']['value']}",
    ]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
