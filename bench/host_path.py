"""`python -m bench --host-path`: how much of the machine's decoding capacity the server turns into answers.

With a near-free model (`null` in server/random_model.py) the server's speed is
set by its host path: gRPC, decoding, batch forming, copies, answers. For each
input (512x512 grayscale JPEG, 64x64 grayscale PNG) one run measures

- decode: images/s of `server.preprocess.decode` on one thread, in a child
  process of the server's own checkout (so another commit's decode is measured
  with that commit's server);
- server: images/s of `python -m server` with the null model, answering an
  `EmbedStream` of `request_images` images per request with `window` requests
  in flight (first request sent to last answer);
- host efficiency = server / (decode x the decode workers the server ran);
- where the CPU went while the server streamed: CPU milliseconds per image of
  the server's event loop (its main thread), compute thread, decode pool
  threads and other threads (gRPC's), of its decode worker processes, and of
  the benchmark's own client (from /proc; the server names its threads).

The server's null model runs on one PyTorch thread (`--null-threads`, via
OMP_NUM_THREADS), as a GPU's forward pass is issued from one thread: with
PyTorch's default of a thread per CPU, its idle OpenMP threads spin after
each op and take CPU time from the decode workers, which no GPU would.

Decode and server alternate for `rounds` rounds; each one's best round counts.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import driver, machine
from bench.images import gray_jpegs, gray_pngs
from bench.server_proc import REPO, ServerProcess, server_breakdown, thread_cpu_seconds
from server.config import Settings
from server.model import ModelRunner

INPUTS: dict[str, Callable[[int], list[bytes]]] = {
    "512x512 grayscale JPEG": lambda count: gray_jpegs(count, 512),
    "64x64 grayscale PNG": lambda count: gray_pngs(count, 64),
}
WORKERS_LOGGED = re.compile(r"(\d+) decode workers")
CPU_PARTS = ("event loop", "compute", "decode pool", "decode workers", "other threads", "client")

# Run in the server's checkout: its own decode, on one thread, for about `seconds`.
_DECODE_RATE = """
import pickle, sys, time
from server.preprocess import ImageLimits, decode
datas, image_size, seconds = pickle.load(sys.stdin.buffer)
limits = ImageLimits(max_bytes=1 << 30, max_pixels=1 << 30)
for data in datas[:4]:
    decode(data, limits, image_size)
count, started = 0, time.perf_counter()
while count < len(datas) or time.perf_counter() - started < seconds:
    decode(datas[count % len(datas)], limits, image_size)
    count += 1
print(count / (time.perf_counter() - started))
"""

# The decode workers a checkout's server runs by default (older ones have no `decode_workers`).
_DEFAULT_WORKERS = """
from server.config import Settings
settings = Settings()
print(getattr(settings, "decode_workers", None) or settings.preprocess_workers)
"""


def decode_rate(tree: Path, datas: list[bytes], image_size: int, seconds: float) -> float:
    """Images/s of `tree`'s `server.preprocess.decode` on one thread (a child process)."""
    out = subprocess.run([sys.executable, "-c", _DECODE_RATE], cwd=tree, check=True, capture_output=True,
                         input=pickle.dumps((datas, image_size, seconds)))  # fmt: skip
    return float(out.stdout)


def decode_workers(tree: Path, server_log: list[str], server_args: list[str]) -> int:
    """How many decode threads the server ran: from its log, its flags, or its checkout's default."""
    for line in server_log:
        if match := WORKERS_LOGGED.search(line):
            return int(match.group(1))
    if "--preprocess-workers" in server_args:
        return int(server_args[server_args.index("--preprocess-workers") + 1])
    out = subprocess.run([sys.executable, "-c", _DEFAULT_WORKERS], cwd=tree, check=True, capture_output=True)
    return int(out.stdout)


def null_rate(model_dir: str, batch_size: int, seconds: float) -> float:
    """The null model's own images/s at the server's batch size (in this process): what the model costs."""
    runner = ModelRunner.load(Settings(model=model_dir, device="cpu"))
    batch = np.zeros((batch_size, runner.image_size, runner.image_size), dtype=np.uint8)
    runner.embed(batch)
    count, started = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - started < seconds:
        runner.embed(batch)
        count += batch_size
    return count / (time.perf_counter() - started)


def run(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    tree = Path(args.server_tree).resolve() if args.server_tree else REPO
    info = machine.describe(torch.device("cpu"))
    flags = ["--model", model_dir, "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", *args.server_arg]  # fmt: skip
    results: dict[str, Any] = {}
    env = {"OMP_NUM_THREADS": str(args.null_threads)} if args.null_threads else None
    with ServerProcess(flags, tree=tree, env=env) as server:
        workers = decode_workers(tree, server.lines, flags)
        for name, make in INPUTS.items():
            datas = make(args.distinct_images)
            requests = driver.requests_for(datas, args.request_images * 8, args.request_images)
            driver.stream(server.address, requests[: max(2, args.window // 4)], args.window)  # warm-up
            decode_best = server_best = 0.0
            rounds: list[dict[str, Any]] = []
            cpu: dict[str, float] = {}
            batch_mean: float | None = None
            for _ in range(args.rounds):
                decode_ips = decode_rate(tree, datas, 224, args.decode_seconds)
                server_ips, cpu_round, batch_round = _server_rate(server, requests, args.window, args.server_seconds)
                rounds.append({"decode": decode_ips, "server": server_ips, "load_average": machine.load_average(),
                               "cpu_ms_per_image": cpu_round, "mean_batch": batch_round})  # fmt: skip
                if server_ips > server_best:
                    cpu, batch_mean = cpu_round, batch_round
                decode_best, server_best = max(decode_best, decode_ips), max(server_best, server_ips)
                log(f"{name}: decode {decode_ips:.0f}/s per thread, server {server_ips:.0f}/s, "
                    f"load {rounds[-1]['load_average']}")  # fmt: skip
            results[name] = {
                "decode_per_thread": decode_best,
                "server": server_best,
                "host_efficiency": server_best / (decode_best * workers),
                "cpu_ms_per_image": cpu,
                "mean_batch": batch_mean,
                "encoded_bytes_mean": sum(map(len, datas)) / len(datas),
                "rounds": rounds,
            }
        server_log = server.lines[:6]
    batch = _logged_batch_size(server_log)
    config = {"server_tree": str(tree), "server_args": flags, "server_log": server_log, "model": "null",
              "request_images": args.request_images, "window": args.window, "rounds": args.rounds,
              "decode_workers": workers, "max_batch_size": batch, "smoke": args.smoke,
              "null_model_threads": args.null_threads or "PyTorch default"}  # fmt: skip
    return {
        "machine": {**info, "load_average_end": machine.load_average()},
        "config": config,
        "null_model_images_per_s": null_rate(model_dir, batch or 16, args.decode_seconds),
        "inputs": results,
    }


def _server_rate(
    server: ServerProcess, distinct: list[Any], window: int, seconds: float
) -> tuple[float, dict[str, float], float | None]:
    """Images/s over about `seconds` (a first stream of 2 windows sizes the timed one), the CPU
    milliseconds per image of each part (`CPU_PARTS`) and the mean batch during the timed stream."""
    first = driver.stream(server.address, [distinct[i % len(distinct)] for i in range(2 * window)], window)
    count = max(2 * window, round(first.images_per_s * seconds / len(distinct[0].images)))
    samples_before = server.samples()
    before, client_before = thread_cpu_seconds(server.pid), _own_cpu_seconds()
    timed = driver.stream(server.address, [distinct[i % len(distinct)] for i in range(count)], window)
    after, client_after = thread_cpu_seconds(server.pid), _own_cpu_seconds()
    samples_after = server.samples()
    used = dict.fromkeys(CPU_PARTS, 0.0)
    for (pid, tid, name), total in after.items():
        used[_part(server.pid, pid, tid, name)] += total - before.get((pid, tid, name), 0.0)
    used["client"] = client_after - client_before
    breakdown = server_breakdown(samples_before, samples_after, timed.seconds)
    return (
        timed.images_per_s,
        {part: 1000 * cpu / timed.images for part, cpu in used.items()},
        breakdown.get("mean_batch_size"),
    )


def _part(server_pid: int, pid: int, tid: int, name: str) -> str:
    """Which of CPU_PARTS a thread is, from the names the server gives its threads (server/runtime.py)."""
    if pid != server_pid:
        return "decode workers"
    if tid == pid:
        return "event loop"
    if name.startswith("torch"):
        return "compute"
    if name.startswith("decode-"):
        return "decode pool"
    return "other threads"


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _logged_batch_size(server_log: list[str]) -> int | None:
    for line in server_log:
        if match := re.search(r"batches of up to (\d+)", line):
            return int(match.group(1))
    return None


def table(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    lines = [
        f"{m['cpu']}, {m['cpus']} CPUs, load {m['load_average_start']} at start, {m['load_average_end']} at end",
        f"server: {c['server_tree']} with the null model ({result['null_model_images_per_s']:.0f} images/s "
        f"alone at batch {c['max_batch_size']}; PyTorch threads in the server: {c.get('null_model_threads')}), "
        f"{c['decode_workers']} decode workers, "
        f"EmbedStream {c['request_images']} images/request x {c['window']} in flight",
        "",
        f"{'input':<26}{'decode/thread':>15}{'server':>10}{'host efficiency':>17}",
    ]
    for name, r in result["inputs"].items():
        lines.append(f"{name:<26}{r['decode_per_thread']:>15.0f}{r['server']:>10.0f}{r['host_efficiency']:>17.2f}")
    lines.append("(images/s, best of each round; host efficiency = server / (decode per thread x decode workers))")
    lines += ["", "CPU per image while the server streamed, its best round (ms), and its mean batch:", f"{'input':<26}"
              + "".join(f"{part:>15}" for part in CPU_PARTS) + f"{'total':>10}{'batch':>8}"]  # fmt: skip
    for name, r in result["inputs"].items():
        cpu, batch = r["cpu_ms_per_image"], r.get("mean_batch")
        lines.append(f"{name:<26}" + "".join(f"{cpu[part]:>15.3f}" for part in CPU_PARTS)
                     + f"{sum(cpu.values()):>10.3f}" + (f"{batch:>8.1f}" if batch else f"{'-':>8}"))  # fmt: skip
    lines.append("(user + system time from /proc; a server without named threads counts them as other threads)")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
