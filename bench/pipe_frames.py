"""`python -m bench --pipe-frames`: the CPU it costs to bring full-size pixels back from a decode worker.

With `--resize-on device` a worker sends each image at full size in its DONE
frame (server/decode/wire.py) instead of 224x224. A forked writer sends
`count` frames of one random image of each size through a pipe set up like a
worker's (1 MiB); this process reads and checks them as the server does
(`wire.read_frame`, `wire.decode_results`). CPU per frame of each side
(process time), to set against the decode that made the image.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import time
from typing import Any

import numpy as np

from bench import machine
from server.decode import wire

SIZES = {"512x512": ((512, 512), 400), "2 MP (1632x1224)": ((1224, 1632), 100), "12 MP (4000x3000)": ((3000, 4000), 30)}
_F_SETPIPE_SZ = 1031


def one_size(shape: tuple[int, int], count: int) -> dict[str, float]:
    read, write = os.pipe()
    for fd in (read, write):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: what a worker spends sending
        os.close(read)
        started = time.process_time()
        for _ in range(count):
            wire.write_frame(write, wire.DONE, *wire.encode_results([image], []))
        os.write(report_write, f"{(time.process_time() - started) / count}".encode())
        os._exit(0)
    os.close(write)
    os.close(report_write)
    started = time.process_time()
    for _ in range(count):
        _, body = wire.read_frame(read, wire.max_results_body(1, image.size))
        wire.decode_results(body, 1, None)
    reader = (time.process_time() - started) / count
    os.waitpid(pid, 0)
    writer = float(os.read(report_read, 64))
    os.close(read)
    os.close(report_read)
    return {"reader_ms": 1000 * reader, "writer_ms": 1000 * writer, "megabytes": image.size / 1e6}


def run(args: argparse.Namespace) -> dict[str, Any]:
    scale = 10 if args.smoke else 1
    info = {"cpu": machine.cpu_name(), "cpus": os.cpu_count()}
    sizes = {name: one_size(shape, max(2, count // scale)) for name, (shape, count) in SIZES.items()}
    return {"machine": {**info, "load_average": machine.load_average()}, "sizes": sizes}


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    header = f"{'image':<20}{'MB':>6}{'server ms':>11}{'worker ms':>11}"
    lines = [f"{m['cpu']}, {m['cpus']} CPUs, load {m['load_average']}", "", header]
    for name, r in result["sizes"].items():
        lines.append(f"{name:<20}{r['megabytes']:>6.1f}{r['reader_ms']:>11.3f}{r['writer_ms']:>11.3f}")
    lines.append("(CPU per full-size frame: the server reading and checking it, the worker writing it)")
    return "\n".join(lines)
