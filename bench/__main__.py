"""`python -m bench`: the service against the model's own limit, in one run, on the same JPEGs and dtype.

    python -m bench --size small --dtype bfloat16 --json out.json
    python -m bench --smoke --json smoke.json      # seconds, tiny model (CI)
    python -m bench --host-path                    # the host path alone: null model, decode vs server
    python -m bench --host-path --capacity         # CPU per image per input, resize placement and decode mode
    python -m bench --fast-fidelity --photos-dir DIR   # --decode fast vs exact on photographs: CPU, cosine
    python -m bench --pipe-frames                  # CPU of full-size pixels through a decode worker's pipe
    python -m bench --overload --size base --dtype float32   # backpressure: bulk client, bursts, idle streams
    python -m bench --patch-tokens --size small --dtype float32  # 64-image requests: patch tokens vs pooled
    python -m bench --http --size small --dtype float32      # HTTP POST /v1/embed against gRPC Embed, one server
    python -m bench --door --json door.json  # the front doors against slow and hostile clients (tiny model)

Raw, service and seed-style are measured in alternating rounds while the
server is up, and each path's best round is reported: on a shared machine a
burst of someone else's load then lowers one round, not one path.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import (
    ablation,
    capacity,
    door,
    driver,
    fidelity,
    flops,
    host_path,
    http_path,
    machine,
    overload,
    patch_tokens,
    paths,
    pipe_frames,
    report,
)
from bench.images import gray_jpegs
from bench.server_proc import ServerProcess, server_breakdown
from server.config import Settings
from server.model import FastPaths, ModelRunner, resolve_device
from server.preprocess import ImageLimits, decode
from server.random_model import SIZES, build_model_dir
from server.runtime import shared_compute_thread

SMOKE = {
    "size": "tiny", "batch_sizes": "1,4", "raw_seconds": 0.2, "service_images": 32, "request_images": 4,
    "window": 4, "seed_images": 4, "unary_calls": 5, "distinct_images": 8, "matmul_seconds": 0.1,
    "ablate_seconds": 0.3, "rounds": 1,
}  # fmt: skip
TOKENS_SMOKE = {"size": "tiny", "service_images": 128, "distinct_images": 8, "rounds": 1}
OVERLOAD_SMOKE = {"size": "tiny", "photos": 40, "burst_calls": 20, "idle_streams": 400, "settle_s": 1.0}
HTTP_SMOKE = {"size": "tiny", "distinct_images": 8, "request_images": 4, "window": 2, "rounds": 1}
DOOR_SMOKE = {
    "size": "tiny", "slow_uploads": 4, "half_sent": 20, "door_seconds": 2.0, "json_mb": 1.0, "grpc_calls": 4,
    "grpc_images": 2, "settle_s": 1.0,
}  # fmt: skip
HOST_SMOKE = {
    "distinct_images": 8, "request_images": 4, "window": 4, "rounds": 1, "decode_seconds": 0.2,
    "server_seconds": 0.3,
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=list(SIZES), help="random-weight DINOv2 of this size [small; --door tiny]")
    p.add_argument("--model", help="an existing model folder instead of a random --size one")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--image-size", type=int, help="the served N (raw, service and seed-style) [224, card]")
    p.add_argument("--preprocess", default="card", choices=["card", "checkpoint"], help="[%(default)s]")
    p.add_argument("--batch-sizes", default="1,4,8,16,32", help="raw: batch sizes to try")
    p.add_argument("--raw-seconds", type=float, default=4.0, help="raw: seconds per batch size and per round")
    p.add_argument("--rounds", type=int, help="alternating raw / service / seed-style rounds (3, --host-path too)")
    p.add_argument("--service-seconds", type=float, default=15.0, help="service: about this long per round")
    p.add_argument("--service-images", type=int, default=0, help="service: images per round (overrides seconds)")
    p.add_argument("--request-images", type=int, help="service: images per EmbedRequest (8; --host-path, --http 32)")
    p.add_argument("--window", type=int, help="service: requests in flight on the stream (16; --http 4)")
    p.add_argument("--max-batch-size", type=int, default=0, help="server's --max-batch-size (0: raw's best)")
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag: --server-arg=--max-wait-ms=2")
    p.add_argument("--seed-images", type=int, default=24, help="seed-style: images per round (and parity sample)")
    p.add_argument("--unary-calls", type=int, default=50, help="unary latency: calls at idle")
    p.add_argument("--distinct-images", type=int, default=64, help="distinct JPEGs generated, cycled")
    p.add_argument("--matmul-seconds", type=float, default=3.0)
    p.add_argument("--compile", action="store_true", help="torch.compile (raw and server); ablation adds a step")
    p.add_argument("--ablate", action="store_true", help="also measure the fast paths one after another")
    p.add_argument("--ablate-seconds", type=float, default=12.0, help="ablation: seconds per step")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--smoke", action="store_true", help="seconds-long check of the machinery (tiny model)")
    p.add_argument(
        "--host-path",
        action="store_true",
        help="only the host path: decode rate per thread vs the server's rate with the null model",
    )
    p.add_argument(
        "--capacity",
        action="store_true",
        help="--host-path: CPU per image and a 16-CPU machine's feed rate per input, placement and mode",
    )
    p.add_argument(
        "--fast-fidelity",
        action="store_true",
        help="only --decode fast against exact on the photographs of --photos-dir: CPU and cosine",
    )
    p.add_argument(
        "--pipe-frames", action="store_true", help="only the CPU of full-size pixels through a decode worker's pipe"
    )
    p.add_argument("--photos-dir", help="--fast-fidelity, --capacity: a folder of PNG/JPEG photographs (skimage/data)")
    p.add_argument("--server-tree", help="--host-path: run `python -m server` (and its decode) from this checkout")
    p.add_argument("--decode-seconds", type=float, default=5.0, help="--host-path: decode seconds per round")
    p.add_argument("--null-threads", type=int, default=1,
                   help="--host-path, --http --size null: the server's OMP_NUM_THREADS (0 = PyTorch's "
                   "default)")  # fmt: skip
    p.add_argument("--server-seconds", type=float, default=10.0, help="--host-path: server seconds per round")
    p.add_argument("--http", action="store_true",
                   help="only HTTP POST /v1/embed (JSON, multipart) against gRPC Embed, on one server")  # fmt: skip
    p.add_argument("--overload", action="store_true",
                   help="only backpressure: the bulk client, a burst of calls and idle streams on --size")  # fmt: skip
    p.add_argument("--photos", type=int, default=300, help="--overload: JPEGs the bulk client embeds")
    p.add_argument("--burst-calls", type=int, default=120, help="--overload: concurrent 32-image Embed calls")
    p.add_argument("--idle-streams", type=int, default=3000, help="--overload: idle streams of one caller")
    p.add_argument("--busy-loops", type=int, default=0, help="--overload: busy-loop processes beside it")
    p.add_argument("--settle-s", type=float, help="--overload, --door: idle seconds before RSS after [20; --door 30]")
    p.add_argument("--patch-tokens", action="store_true",
                   help="only patch tokens against pooled outputs: 64-image EmbedStream requests")  # fmt: skip
    p.add_argument("--token-dtype", default="float16", choices=list(patch_tokens.TOKEN_DTYPES),
                   help="--patch-tokens: the tokens' dtype")  # fmt: skip
    p.add_argument("--door", action="store_true",
                   help="only the front doors against slow and hostile clients (bench/door.py)")  # fmt: skip
    p.add_argument("--door-seconds", type=float, default=20.0, help="--door: seconds the slow clients are held")
    p.add_argument("--slow-uploads", type=int, default=8, help="--door: uploads sending a byte every 2 s")
    p.add_argument("--half-sent", type=int, default=300, help="--door: connections that never end their headers")
    p.add_argument("--json-mb", type=float, default=64.0, help="--door: size of the wrong-shaped JSON bodies")
    p.add_argument("--grpc-calls", type=int, default=32, help="--door: concurrent Embed calls of large PNGs")
    p.add_argument("--grpc-images", type=int, default=15, help="--door: ~8.5 MB noise PNGs per Embed call")
    args = p.parse_args(argv)
    args.size = args.size or ("tiny" if args.door else "small")
    args.settle_s = args.settle_s if args.settle_s is not None else (30.0 if args.door else 20.0)
    args.request_images = args.request_images or (32 if args.host_path or args.http else 8)
    args.window = args.window or (4 if args.http else 16)
    args.rounds = args.rounds or 3
    if args.smoke:
        smoke = (
            HOST_SMOKE if args.host_path else HTTP_SMOKE if args.http else OVERLOAD_SMOKE if args.overload else SMOKE
        )
        smoke = DOOR_SMOKE if args.door else smoke
        for key, value in (TOKENS_SMOKE if args.patch_tokens else smoke).items():
            setattr(args, key, value)
    args.seed_images = min(args.seed_images, args.distinct_images)
    return args


def run(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """Every measurement: matmul peak, raw batch sweep, rounds of raw / service / seed-style, unary, ablation."""
    compute = shared_compute_thread()  # all PyTorch work of this process on one thread: see server/runtime.py
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    info = machine.describe(device)
    if info["load_average_start"][0] > 1:
        log(f"warning: load average {info['load_average_start']}: other work shares the CPU, numbers are noisy")
    datas = gray_jpegs(args.distinct_images)
    settings = Settings(model=model_dir, dtype=args.dtype, device=str(device), image_size=args.image_size,
                        preprocess=args.preprocess)  # fmt: skip
    runner = ModelRunner.load(settings, FastPaths(compile=args.compile))
    limits = ImageLimits(max_bytes=1 << 30, max_pixels=1 << 30)
    pixels = np.stack([decode(d, limits, runner.norm.geometry) for d in datas])
    config = runner.model.config
    flops_per_image = flops.model_flops(config, runner.image_size)
    log(f"{info['cpu']}, load {info['load_average_start']}; {flops_per_image / 1e9:.2f} GFLOP per image")

    side = 256 if args.smoke else 2048
    tokens = (runner.image_size // int(config.patch_size)) ** 2 + 1
    shapes = [(side, side, side), (tokens * 16, runner.embedding_dim, 4 * runner.embedding_dim)]
    gflops = compute.run(flops.matmul_peak, dtype, shapes, args.matmul_seconds, str(device))  # and in each round
    log(f"matmul {args.dtype}: {gflops}")

    sweep = paths.raw(runner, pixels, [int(b) for b in args.batch_sizes.split(",")], args.raw_seconds)
    best_batch = sweep.best_batch_size
    log(f"raw: {sweep.by_batch_size}, batch of one {sweep.batch1_ms:.1f} ms")
    max_batch = args.max_batch_size or best_batch
    per_round = args.service_images or max(64, round(sweep.images_per_s * args.service_seconds))
    per_round = math.ceil(per_round / args.request_images) * args.request_images
    server_args = server_flags(args, model_dir, str(device), max_batch)
    handler = compute.run(paths.SeedHandler, model_dir, args.image_size, args.preprocess)

    rounds: list[dict[str, Any]] = []
    with ServerProcess(server_args) as server:
        warm = driver.requests_for(datas, min(per_round, 4 * max_batch), args.request_images)
        driver.stream(server.address, warm, args.window)
        requests = driver.requests_for(datas, per_round, args.request_images)
        for number in range(args.rounds):
            raw_ips = paths.rate(runner, pixels, best_batch, args.raw_seconds)
            before = server.samples()
            service = driver.stream(server.address, requests, args.window, keep=args.seed_images)
            inside = server_breakdown(before, server.samples(), service.seconds)
            seed = compute.run(paths.seed_style, handler, datas[: args.seed_images])
            again = compute.run(flops.matmul_peak, dtype, shapes, args.matmul_seconds / args.rounds, str(device))
            gflops = {shape: max(value, again[shape]) for shape, value in gflops.items()}
            rounds.append({
                "raw": raw_ips, "service": service.images_per_s, "seed_style": seed.images_per_s,
                "service_images": service.images, "service_seconds": service.seconds, "server": inside,
                "load_average": machine.load_average(),
                "parity": parity(args.dtype, service.embeddings, seed.embeddings),
            })  # fmt: skip
            log(f"round {number + 1}: raw {raw_ips:.2f}, service {service.images_per_s:.2f}, "
                f"seed-style {seed.images_per_s:.2f} images/s, load {rounds[-1]['load_average']}")  # fmt: skip
        unary = driver.unary_latency(server.address, datas, args.unary_calls)
        rss = server.peak_rss_bytes()
        server_log = server.lines[:4]
    reference = seed.embeddings
    del handler

    peak = max(gflops.values())

    def share(ips: float) -> float:
        return flops_per_image * ips / (peak * 1e9)

    raw_best = max([sweep.images_per_s] + [r["raw"] for r in rounds])
    best_round = max(rounds, key=lambda r: r["service"])
    service_best, seed_best = best_round["service"], max(r["seed_style"] for r in rounds)
    result: dict[str, Any] = {
        "machine": info,
        "config": {
            "size": Path(args.model).name if args.model else args.size,
            "model": model_dir,
            "dtype": args.dtype,
            "device": str(device),
            "image_size": runner.image_size,
            "preprocess": args.preprocess,
            "distinct_images": args.distinct_images,
            "image": "512x512 grayscale JPEG, quality 90",
            "request_images": args.request_images,
            "window": args.window,
            "rounds": args.rounds,
            "smoke": args.smoke,
            "compile": args.compile,
            "server_args": server_args,
            "server_log": server_log,
        },
        "flops_per_image": flops_per_image,
        "matmul_gflops": gflops,
        "matmul_peak_gflops": peak,
        "raw": {
            "images_per_s": raw_best,
            "best_batch_size": best_batch,
            "by_batch_size": sweep.by_batch_size,
            "batch1_ms": sweep.batch1_ms,
            "share_of_peak": share(raw_best),
        },
        "service": {
            "images_per_s": service_best,
            "images": best_round["service_images"],
            "seconds": best_round["service_seconds"],
            "max_batch_size": max_batch,
            "peak_rss_mb": rss / 2**20,
            "share_of_peak": share(service_best),
            "server": best_round["server"],
        },
        "seed_style": {"images_per_s": seed_best, "images": args.seed_images, "share_of_peak": share(seed_best)},
        "unary": {"calls": unary.calls, "p50_ms": unary.p50_ms, "p99_ms": unary.p99_ms, "mean_ms": unary.mean_ms},
        "ratios": {"service_over_raw": service_best / raw_best, "service_over_seed": service_best / seed_best},
        "parity": min((r["parity"] for r in rounds), key=lambda p: p["min_cosine"]),
        "rounds": rounds,
    }
    if args.ablate:
        steps = ablation.ablate(settings, pixels, reference, best_batch, args.ablate_seconds, args.compile)
        result["ablation"] = [
            {"name": s.name, "dtype": s.dtype, "images_per_s": s.images_per_s, "min_cosine": s.min_cosine,
             "fast_paths": vars(s.fast)} for s in steps
        ]  # fmt: skip
        result["config"]["ablation_batch_size"] = best_batch
    result["machine"]["load_average_end"] = machine.load_average()
    result["targets"] = report.targets(result)
    return result


def server_flags(args: argparse.Namespace, model_dir: str, device: str, max_batch: int | str) -> list[str]:
    flags = ["--model", model_dir, "--dtype", args.dtype, "--device", device, "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", "0", "--max-batch-size", str(max_batch),
             "--preprocess", args.preprocess]  # fmt: skip
    if args.image_size:
        flags += ["--image-size", str(args.image_size)]
    if args.compile:
        flags += ["--compile", "on"]
    return flags + args.server_arg


def parity(dtype: str, service: dict[int, np.ndarray], reference: list[np.ndarray]) -> dict[str, Any]:
    """The service's embeddings against the seed-style float32 reference, image by image."""
    cosines, diffs = [], []
    for index, ref in enumerate(reference):
        vec = service[index]
        cosines.append(float(vec @ ref / (np.linalg.norm(vec) * np.linalg.norm(ref))))
        diffs.append(float(np.abs(vec - ref).max() / np.abs(ref).max()))
    return {"dtype": dtype, "images": len(reference), "min_cosine": min(cosines), "max_abs_diff_rel": max(diffs)}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dinov2-bench-") as tmp:
        if args.pipe_frames:
            result = pipe_frames.run(args)
        elif args.fast_fidelity:
            result = fidelity.run(args, args.model or str(build_model_dir(Path(tmp) / "small", "small")))
        elif args.host_path:
            module = capacity if args.capacity else host_path
            result = module.run(args, str(build_model_dir(Path(tmp) / "null", "null")))
        else:
            model_dir = args.model or str(build_model_dir(Path(tmp) / args.size, args.size))
            if args.patch_tokens:
                flags = server_flags(args, model_dir, args.device, args.max_batch_size or "auto")
                result = patch_tokens.run(args, model_dir, flags)
            elif args.http:
                result = http_path.run(args, model_dir)
            elif args.door:
                result = door.run(args, model_dir)
            else:
                result = overload.run(args, model_dir) if args.overload else run(args, model_dir)
    if args.pipe_frames:
        table = pipe_frames.table
    elif args.fast_fidelity:
        table = fidelity.table
    elif args.host_path:
        table = capacity.table if args.capacity else host_path.table
    elif args.patch_tokens:
        table = patch_tokens.table
    elif args.http:
        table = http_path.table
    elif args.door:
        table = door.table
    else:
        table = overload.table if args.overload else report.table
    print(table(result))
    if args.json:
        report.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
