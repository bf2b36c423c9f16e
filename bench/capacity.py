"""`python -m bench --host-path --capacity`: the server's CPU per image for each resize placement and
decode mode, per input kind, and the images/s a 16-CPU machine could feed at that cost.

For each `--resize-on` x `--decode` setting one server (the null model, on the CPU, one PyTorch
thread as a GPU's forward pass is issued from one) streams each input kind; the CPU of each of
its parts is read from /proc before and after (bench/host_path.py's breakdown). The decode
workers' share is what moves between placements; with `--resize-on device` the resize runs on
the compute thread (here on the CPU, float64 matrix products: on a GPU that part leaves the
host), so it is reported apart. The capacity is 16 x 1000 / (host CPU ms per image), the host
CPU being everything but the compute thread and the benchmark's client, and it stands beside
the card rates recorded in BENCHMARKS.md ("The GPU data path").
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import driver, fidelity, machine
from bench.host_path import CPU_PARTS, _part, log
from bench.images import gray_pngs
from bench.server_proc import ServerProcess, thread_cpu_seconds

CARD_RATES = {"H100, dinov2-small bf16, batch 512": 10_094, "H100, dinov2-small bf16, batch 256": 9_944}
CONFIGS = [("workers", "exact"), ("device", "exact"), ("workers", "fast"), ("device", "fast")]
CPUS = 16


def photo_jpeg(seed: int, width: int, height: int, quality: int = 90) -> bytes:
    """A photo-like grayscale JPEG of any size: smooth waves, edges and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]
    wave = 80 * np.sin(x / width * (3 + seed % 5) * np.pi) * np.cos(y / height * (2 + seed % 3) * np.pi)
    edges = 50 * (((x // (width // 9 + 1)) + (y // (height // 7 + 1)) + seed) % 2)
    pixels = (110 + wave + edges + rng.normal(0, 6, (height, width))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# input kind -> (make `count` distinct images, images per run, images per request)
INPUTS: dict[str, tuple[Callable[[int], list[bytes]], int, int]] = {
    "512x512 JPEG": (lambda n: [photo_jpeg(s, 512, 512) for s in range(n)], 512, 32),
    "2 MP JPEG (1632x1224)": (lambda n: [photo_jpeg(s, 1632, 1224) for s in range(n)], 96, 8),
    "12 MP JPEG (4000x3000)": (lambda n: [photo_jpeg(s, 4000, 3000) for s in range(n)], 24, 2),
    "64x64 PNG": (lambda n: gray_pngs(n, 64), 1024, 32),
}


def from_photos(folder: str) -> dict[str, tuple[Callable[[int], list[bytes]], int, int]]:
    """INPUTS with the JPEGs made from the photographs in `folder` (bench/fidelity.py): color, quality 90."""
    photos = list(fidelity.photographs(Path(folder)).values())
    sizes = {"512x512 JPEG": (512, 512), "2 MP JPEG (1632x1224)": (1632, 1224), "12 MP JPEG (4000x3000)": (4000, 3000)}

    def maker(size: tuple[int, int]) -> Callable[[int], list[bytes]]:
        return lambda n: [fidelity.jpeg_of(photos[i % len(photos)], size) for i in range(max(n, len(photos)))]

    return {name: (maker(sizes[name]), *INPUTS[name][1:]) if name in sizes else spec for name, spec in INPUTS.items()}


def run(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    info = machine.describe(torch.device("cpu"))
    distinct = max(2, min(args.distinct_images, 8))
    scale = 8 if args.smoke else 1
    kinds = from_photos(args.photos_dir) if args.photos_dir else INPUTS
    inputs = {name: (make(distinct), max(4, total // scale), per) for name, (make, total, per) in kinds.items()}
    results: dict[str, dict[str, Any]] = {}
    for resize_on, mode in CONFIGS:
        flags = ["--model", model_dir, "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                 "0", "--resize-on", resize_on, "--decode", mode, *args.server_arg]  # fmt: skip
        env = {"OMP_NUM_THREADS": str(args.null_threads)} if args.null_threads else None
        with ServerProcess(flags, env=env) as server:
            for name, (datas, total, per_request) in inputs.items():
                requests = driver.requests_for(datas, total, per_request)
                driver.stream(server.address, requests[:2], 2)  # warm-up: each size's first resize
                cpu, rate = _cpu_per_image(server, requests, window=4)
                results.setdefault(name, {})[f"{resize_on}/{mode}"] = {"cpu_ms_per_image": cpu, "server": rate}
                log(f"{name}, resize on {resize_on}, decode {mode}: {rate:.0f} images/s, "
                    f"host {host_ms(cpu):.2f} ms/image, load {machine.load_average()}")  # fmt: skip
    return {"machine": {**info, "load_average_end": machine.load_average()}, "cpus": CPUS,
            "card_rates": CARD_RATES, "jpegs": f"photographs of {args.photos_dir}" if args.photos_dir else
            "synthetic grayscale (bench/capacity.py photo_jpeg)", "inputs": results}  # fmt: skip


def _cpu_per_image(server: ServerProcess, requests: list[Any], window: int) -> tuple[dict[str, float], float]:
    before = thread_cpu_seconds(server.pid)
    timed = driver.stream(server.address, requests, window)
    after = thread_cpu_seconds(server.pid)
    used = dict.fromkeys(CPU_PARTS, 0.0)
    for (pid, tid, name), total in after.items():
        used[_part(server.pid, pid, tid, name)] += total - before.get((pid, tid, name), 0.0)
    return {part: 1000 * seconds / timed.images for part, seconds in used.items()}, timed.images_per_s


def host_ms(cpu: dict[str, float]) -> float:
    """CPU per image of the host path: every part of the server but the compute thread."""
    return sum(ms for part, ms in cpu.items() if part not in ("compute", "client"))


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    cards = "; ".join(f"{name}: {rate:,} images/s" for name, rate in result["card_rates"].items())
    lines = [
        f"{m['cpu']}, {m['cpus']} CPUs, load {m['load_average_start']} at start, {m['load_average_end']} at end",
        f"card rates (BENCHMARKS.md): {cards}",
        f"JPEGs: {result.get('jpegs', 'synthetic')}",
        "",
        f"{'input':<24}{'resize/decode':>16}{'workers ms':>12}{'compute ms':>12}{'host ms':>10}{'feed/s':>16}",
    ]
    for name, configs in result["inputs"].items():
        for config, r in configs.items():
            cpu = r["cpu_ms_per_image"]
            host = host_ms(cpu)
            lines.append(f"{name:<24}{config:>16}{cpu['decode workers']:>12.2f}{cpu['compute']:>12.2f}"
                         f"{host:>10.2f}{result['cpus'] * 1000 / host:>16,.0f}")  # fmt: skip
    lines.append(f"(CPU ms per image from /proc: decode worker processes; the compute thread, which runs the device "
                 f"resize, here on the CPU; host = all but compute and client; feed/s = {result['cpus']} CPUs x "
                 "1000 / host ms)")  # fmt: skip
    return "\n".join(lines)
