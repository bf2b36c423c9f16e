"""`python -m bench.ray_path`: the Ray Data path (offline/) against the model's raw rate, in one run, same JPEGs.

    python -m bench.ray_path --size small --dtype bfloat16 --images 300

Raw is `python -m bench`'s raw path (bench/paths.py: back-to-back forward
passes on ready pixels, best batch size). The Ray path is the whole job on a
local Ray: JPEG files read, decoded by the service's `decode` in Ray tasks,
embedded by one actor, written as Parquet parts. Its steady rate counts the
rows the write stage hands on after the first part, over the time to the
last; its end-to-end rate includes Ray's start of the actor (model load,
warm-up) and the listing. Raw and Ray alternate for `--rounds`, best round
each, as `python -m bench` does.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import machine, paths
from bench.images import gray_jpeg
from server.config import Settings
from server.model import ModelRunner, resolve_device
from server.preprocess import ImageLimits, decode
from server.random_model import SIZES, build_model_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ray_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--size", default="small", choices=list(SIZES))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--images", type=int, default=300, help="distinct 512x512 JPEG files the job embeds")
    p.add_argument("--batch-sizes", default="1,4,8,16,32", help="raw: batch sizes to try")
    p.add_argument("--raw-seconds", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=0, help="Ray path's batch (0: raw's best)")
    p.add_argument("--rows-per-part", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the numbers here")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def steady_rate(timeline: list[tuple[float, int]]) -> float:
    """Rows per second after the first handed-on part, to the last."""
    if len(timeline) < 2:
        return 0.0
    rows = sum(n for _, n in timeline[1:])
    return rows / max(timeline[-1][0] - timeline[0][0], 1e-9)


def ray_round(folder: Path, out: Path, model_dir: str, dtype: str, batch_size: int, rows_per_part: int) -> dict:
    from offline.job import Job, JobSpec, Resources

    spec = JobSpec((str(folder),), str(out), Settings(model=model_dir, dtype=dtype), overwrite=True,
                   resources=Resources(batch_size=batch_size, rows_per_part=rows_per_part))  # fmt: skip
    job = Job(spec, io.StringIO())
    started = time.monotonic()
    status = job.run()
    elapsed = time.monotonic() - started
    images = sum(n for _, n in job.timeline)
    if status != 0 or not images:
        raise SystemExit(f"the Ray job failed (status {status})")
    return {"steady": steady_rate(job.timeline), "end_to_end": images / elapsed, "images": images}


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    device = resolve_device("cpu")
    info = machine.describe(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = str(build_model_dir(root / "model", args.size))
        folder = root / "images"
        folder.mkdir()
        for n in range(args.images):
            (folder / f"{n:06d}.jpg").write_bytes(gray_jpeg(n))
        runner = ModelRunner.load(Settings(model=model_dir, dtype=args.dtype, device="cpu"))
        limits = ImageLimits(1 << 30, 1 << 30)
        pixels = np.stack([decode((folder / f"{n:06d}.jpg").read_bytes(), limits, runner.image_size)
                           for n in range(min(64, args.images))])  # fmt: skip
        sweep = paths.raw(runner, pixels, [int(b) for b in args.batch_sizes.split(",")], args.raw_seconds)
        batch = args.batch_size or sweep.best_batch_size
        log(f"{info['cpu']}, load {info['load_average_start']}; raw {sweep.by_batch_size}; Ray batch {batch}")
        # Ray starts its workers at nice 15 (so its own daemons come first). On a node of its own that changes
        # nothing; on a shared machine it would hand the Ray path's CPU to other people's work and not raw's.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _system_config={"worker_niceness": 0})  # fmt: skip
        ray.data.DataContext.get_current().enable_progress_bars = False
        rounds: list[dict[str, Any]] = []
        try:
            for number in range(args.rounds):
                raw_ips = paths.rate(runner, pixels, sweep.best_batch_size, args.raw_seconds)
                result = ray_round(folder, root / "out", model_dir, args.dtype, batch, args.rows_per_part)
                rounds.append({"raw": raw_ips, **result, "load_average": machine.load_average()})
                log(f"round {number + 1}: raw {raw_ips:.1f} images/s; Ray steady {result['steady']:.1f}, "
                    f"end to end {result['end_to_end']:.1f} images/s ({result['images']} images)")  # fmt: skip
        finally:
            ray.shutdown()
    raw_best = max(max(r["raw"] for r in rounds), sweep.images_per_s)
    steady_best = max(r["steady"] for r in rounds)
    e2e_best = max(r["end_to_end"] for r in rounds)
    summary = {
        "machine": info, "size": args.size, "dtype": args.dtype, "images": args.images, "ray_batch_size": batch,
        "raw_by_batch_size": sweep.by_batch_size, "rounds": rounds, "raw_best": raw_best,
        "ray_steady_best": steady_best, "ray_end_to_end_best": e2e_best,
        "steady_over_raw": steady_best / raw_best, "end_to_end_over_raw": e2e_best / raw_best,
        "load_average_end": machine.load_average(), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    log(f"raw {raw_best:.1f} images/s; Ray path steady {steady_best:.1f} ({summary['steady_over_raw']:.2f} x raw), "
        f"end to end {e2e_best:.1f} ({summary['end_to_end_over_raw']:.2f} x raw); "
        f"load {summary['load_average_end']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
