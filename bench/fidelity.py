"""`python -m bench --fast-fidelity --photos-dir DIR`: what `--decode fast` saves and what it changes, on photographs.

Each photograph in DIR (PNG or JPEG; e.g. the sample photographs inside the
scikit-image wheel, skimage/data) is resized (bicubic, in RGB) to each target
size and encoded as a quality-90 color JPEG: 512x512, 1632x1224 (2 MP) and
4000x3000 (12 MP). For each JPEG and each draft factor (the fast decode keeps
no less than factor x the model's size a side; `server.preprocess.FAST_DRAFT_FACTOR`
is the one the server runs) it measures

- CPU per image of `server.preprocess.decode` on one thread, exact and fast
  (best of `rounds`, process time: the decode, conversion and resize to 224),
  the two measured one after the other for each photograph and factor, so a
  change in the machine's load moves both;
- the cosine of the embedding of the fast pixels to that of the exact ones
  (CLS, float32, the server's model runner; a random-weight dinov2-small unless
  --model names a real one), min and median over the photographs;
- the mean absolute difference of the 224x224 model input, in grey levels.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import machine
from server import preprocess
from server.config import Settings
from server.model import ModelRunner
from server.preprocess import ImageLimits, decode

SIZES = {"512x512": (512, 512), "2 MP (1632x1224)": (1632, 1224), "12 MP (4000x3000)": (4000, 3000)}
FACTORS = (1, 1.5, 2, 3)
LIMITS = ImageLimits(max_bytes=1 << 30, max_pixels=1 << 30)


def photographs(folder: Path) -> dict[str, Image.Image]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    photos = {p.stem: Image.open(p).convert("RGB") for p in files}
    if not photos:
        raise SystemExit(f"error: no PNG or JPEG photographs in {folder}: pass --photos-dir with some")
    return photos


def jpeg_of(photo: Image.Image, size: tuple[int, int]) -> bytes:
    img = photo if photo.size == size else photo.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def cpu_ms(data: bytes, fast: bool, rounds: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(repeat):
            decode(data, LIMITS, 224, fast=fast)
        best = min(best, (time.process_time() - started) / repeat)
    return 1000 * best


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    info = machine.describe(torch.device("cpu"))
    runner = ModelRunner.load(Settings(model=model_dir, device="cpu", dtype="float32"))
    photos = photographs(Path(args.photos_dir))
    results: dict[str, Any] = {}
    for size_name, size in SIZES.items():
        datas = {name: jpeg_of(photo, size) for name, photo in photos.items()}
        native = sorted(name for name, photo in photos.items() if photo.size == size)
        repeat = max(1, round(20 * 512 * 512 / (size[0] * size[1])))
        exact_px = np.stack([decode(d, LIMITS, 224) for d in datas.values()])
        exact_cls = runner.embed(exact_px).cls
        per_factor = {}
        for factor in FACTORS:
            preprocess.FAST_DRAFT_FACTOR = factor
            timed = [(cpu_ms(d, False, args.rounds, repeat), cpu_ms(d, True, args.rounds, repeat))
                     for d in datas.values()]  # fmt: skip
            exact_ms, fast_ms = [e for e, _ in timed], [f for _, f in timed]
            fast_px = np.stack([decode(d, LIMITS, 224, fast=True) for d in datas.values()])
            fast_cls = runner.embed(fast_px).cls
            cosines = [cosine(a, b) for a, b in zip(fast_cls, exact_cls, strict=True)]
            speedups = [e / f for e, f in zip(exact_ms, fast_ms, strict=True)]
            per_factor[factor] = {
                "exact_ms_median": statistics.median(exact_ms), "fast_ms_median": statistics.median(fast_ms),
                "speedup_min": min(speedups), "speedup_median": statistics.median(speedups),
                "cosine_min": min(cosines), "cosine_median": statistics.median(cosines),
                "pixel_mad": float(np.abs(fast_px.astype(np.int16) - exact_px).mean()),
            }  # fmt: skip
            log(f"{size_name} factor {factor}: {per_factor[factor]}")
        preprocess.FAST_DRAFT_FACTOR = DEFAULT_FACTOR
        results[size_name] = {"photos": len(datas), "native_size": native, "factors": per_factor,
                              "jpeg_bytes_median": statistics.median(map(len, datas.values()))}  # fmt: skip
    return {"machine": {**info, "load_average_end": machine.load_average()}, "photos": sorted(photos),
            "model": args.model or "random dinov2-small", "photos_dir": str(args.photos_dir),
            "server_factor": DEFAULT_FACTOR, "sizes": results}  # fmt: skip


DEFAULT_FACTOR = preprocess.FAST_DRAFT_FACTOR


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"{m['cpu']}, {m['cpus']} CPUs, load {m['load_average_start']} at start, {m['load_average_end']} at end",
        f"{len(result['photos'])} photographs from {result['photos_dir']}: {', '.join(result['photos'])}; "
        f"model {result['model']}; the server's factor is {result['server_factor']}",
        "",
        f"{'JPEG':<20}{'factor':>7}{'exact ms':>10}{'fast ms':>9}{'speed-up min/med':>18}"
        f"{'cosine min':>12}{'cosine med':>12}{'pixel MAD':>11}",
    ]
    for size_name, r in result["sizes"].items():
        for factor, f in r["factors"].items():
            lines.append(
                f"{size_name:<20}{factor:>7}{f['exact_ms_median']:>10.2f}{f['fast_ms_median']:>9.2f}"
                f"{f['speedup_min']:>10.2f}/{f['speedup_median']:<7.2f}{f['cosine_min']:>12.6f}"
                f"{f['cosine_median']:>12.6f}{f['pixel_mad']:>11.2f}"
            )
    lines.append("(CPU ms per image, median over the photographs, decode + convert + resize on one thread; "
                 "speed-up = exact / fast per photograph; cosine of CLS embeddings fast vs exact; pixel MAD = mean "
                 "|fast - exact| of the 224x224 input in grey levels)")  # fmt: skip
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True, file=sys.stderr)
