"""`python -m bench --patch-tokens`: patch tokens against pooled embeddings, on one server, in one run.

The same 64-image EmbedStream requests, once asking for the pooled CLS
embedding only and once also for every image's patch tokens (float16 by
default), in alternating rounds; each kind's best round is reported, with
the server's CPU time per image, its decode workers' included (what the
tokens cost the host: the cast, the copy back and the message), the size of
one 64-image response, and the server's memory: after warm-up, at its peak,
and after a few idle seconds (it gives freed memory back when idle).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench import driver, machine
from bench.images import gray_jpegs
from bench.server_proc import ServerProcess, process_tree
from protos.dinov2.v1 import embed_pb2 as pb
from protos.dinov2.v1 import embed_pb2_grpc

REQUEST_IMAGES = 64
WINDOW = 4  # 256 images in flight keep any model busy
SETTLE_S = 3.0
TOKEN_DTYPES = {
    "float32": pb.TOKEN_DTYPE_FLOAT32,
    "float16": pb.TOKEN_DTYPE_FLOAT16,
    "bfloat16": pb.TOKEN_DTYPE_BFLOAT16,
}


def _cpu_seconds(root: int) -> float:
    """User + system CPU time so far of the server and its decode worker processes."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a worker that ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _requests(datas: list[bytes], total: int, tokens: int | None) -> list[pb.EmbedRequest]:
    requests = driver.requests_for(datas, total, REQUEST_IMAGES)
    if tokens is not None:
        for request in requests:
            request.patch_tokens.CopyFrom(pb.PatchTokensOptions(enabled=True, dtype=tokens))
    return requests


def _round(server: ServerProcess, requests: list[pb.EmbedRequest], window: int) -> dict[str, float]:
    cpu = _cpu_seconds(server.pid)
    result = driver.stream(server.address, requests, window)
    cpu_ms = 1000 * (_cpu_seconds(server.pid) - cpu) / result.images
    return {"images_per_s": result.images_per_s, "server_cpu_ms_per_image": cpu_ms}


def _response_bytes(address: str, datas: list[bytes], tokens: int) -> int:
    """The serialized size of one response to 64 images with their patch tokens."""
    request = _requests(datas, REQUEST_IMAGES, tokens)[0]
    with driver.channel(address) as chan:
        response = embed_pb2_grpc.EmbedStub(chan).Embed(request, timeout=600)
    if any(item.HasField("error") for item in response.embeddings):
        raise RuntimeError("an image of the response-size request failed")
    return response.ByteSize()


def run(args: argparse.Namespace, model_dir: str, server_flags: list[str]) -> dict[str, Any]:
    tokens = TOKEN_DTYPES[args.token_dtype]
    datas = gray_jpegs(args.distinct_images)
    total = args.service_images or 4 * REQUEST_IMAGES
    kinds = {
        "pooled": _requests(datas, total, None),
        f"patch_tokens_{args.token_dtype}": _requests(datas, total, tokens),
    }
    best: dict[str, dict[str, float]] = {}
    load_start = machine.load_average()
    # A 64-image request is many seconds of work on a CPU: the bench waits for its answers, it is not refused.
    with ServerProcess([*server_flags, "--max-queue-s", "3600"]) as server:
        driver.stream(server.address, kinds["pooled"][:2], WINDOW)  # warm-up
        warm_rss = server.rss_bytes()
        for _ in range(args.rounds):
            for kind, requests in kinds.items():
                measured = _round(server, requests, WINDOW)
                if kind not in best or measured["images_per_s"] > best[kind]["images_per_s"]:
                    best[kind] = measured
        size = _response_bytes(server.address, datas, tokens)
        peak_rss = server.peak_rss_bytes()
        time.sleep(SETTLE_S)  # idle: the server hands freed memory back after --idle-trim-s (1 s)
        settled_rss = server.rss_bytes()
    pooled, patches = best.values()
    return {
        "machine": {"cpu": machine.cpu_name(), "cpus": os.cpu_count(), "load_average_start": load_start,
                    "load_average_end": machine.load_average()},
        "config": {"model": model_dir, "size": args.size, "dtype": args.dtype, "token_dtype": args.token_dtype,
                   "request_images": REQUEST_IMAGES, "images_per_round": total, "rounds": args.rounds,
                   "window": WINDOW, "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        "kinds": best,
        "throughput_ratio": patches["images_per_s"] / pooled["images_per_s"],
        "response_bytes_64_images": size,
        "memory_mb": {"after_warmup": warm_rss / 1e6, "peak": peak_rss / 1e6, "settled": settled_rss / 1e6},
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    lines = [f"{m['cpu']}, {m['cpus']} CPUs, load {m['load_average_start']} -> {m['load_average_end']}",
             f"dinov2-{c['size']} {c['dtype']}, EmbedStream of {c['request_images']}-image requests, window "
             f"{c['window']}, best of {c['rounds']} rounds of {c['images_per_round']} images", "",
             f"{'output':<24}{'images/s':>10}{'server CPU ms/image':>22}"]  # fmt: skip
    for kind, r in result["kinds"].items():
        lines.append(f"{kind:<24}{r['images_per_s']:>10.1f}{r['server_cpu_ms_per_image']:>22.2f}")
    lines.append(f"patch tokens / pooled throughput: {result['throughput_ratio']:.3f}")
    mem = result["memory_mb"]
    lines.append(f"server RSS (with decode workers): {mem['after_warmup']:.0f} MB after warm-up, "
                 f"peak {mem['peak']:.0f} MB, {mem['settled']:.0f} MB after {SETTLE_S:g} s idle")  # fmt: skip
    size = result["response_bytes_64_images"]
    lines.append(f"one 64-image response with {c['token_dtype']} patch tokens: {size:,} bytes")
    return "\n".join(lines)
