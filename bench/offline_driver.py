"""The offline job's driver memory against the size of OUT_DIR.

    python -m bench.offline_driver --rows 1000000 10000000 --old b3c8bc4

For each row count it writes a synthetic OUT_DIR (parts of 4096 rows as the
write stage makes them; ids like `shards/000123.tar/000123456.jpg`; 1% of the
rows written twice, as retried tasks do; 0.1% failed), then runs in a fresh
process what the driver does with it: the resume scan (`Store.scan`, the done
set the selector and the decode tasks share) and the final one-row-per-id
pass (`Store.finish`). It reports the child's peak RSS and seconds. No model
and no Ray are needed; the embedding column is 4 floats wide, as the driver
never reads it (it rewrites only the parts that hold repeats).

`--old REV` also measures the store of git revision REV (e.g. b3c8bc4, which
held every id in Python sets) on the same folder, for the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from offline.store import Store

ROWS_PER_PART = 4096


def generate(out: Path, rows: int) -> None:
    store = Store(str(out))
    vectors = np.zeros((ROWS_PER_PART, 4), np.float32)
    for start in range(0, rows, ROWS_PER_PART):
        ids = [f"shards/{i // 10_000:06d}.tar/{i:09d}.jpg" for i in range(start, min(start + ROWS_PER_PART, rows))]
        codes = ["INVALID_ARGUMENT" if i % 1000 == 999 else "" for i in range(start, start + len(ids))]
        store.write_part(ids, vectors[: len(ids)], codes, ["bad" if c else "" for c in codes])
        if (start // ROWS_PER_PART) % 100 == 0:  # a retried task: 1% of the rows again, batched differently
            repeat = ids
            store.write_part(repeat[::-1], vectors[: len(repeat)], [""] * len(repeat), [""] * len(repeat))


def measure(out: Path, old: str | None) -> dict[str, float]:
    """Runs in the child: the driver's passes over OUT_DIR, timed; peak RSS from the kernel."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    started = time.perf_counter()
    if old is None:
        store = Store(str(out))
        ledger = store.scan()
        done = ledger.done(retry_failed=False)
        del ledger  # as the job does: the done set is what the run holds
        scanned = time.perf_counter()
        rows_done = len(done)
        del done
        tally = store.finish(store.scan())
    else:
        module = types.ModuleType("old_store")
        sys.modules["old_store"] = module  # dataclasses look their module up
        source = subprocess.run(["git", "show", f"{old}:offline/store.py"], capture_output=True, text=True, check=True)
        exec(compile(source.stdout, f"{old}:offline/store.py", "exec"), module.__dict__)
        store = module.Store(str(out))
        rows_done = len(store.done_ids())
        scanned = time.perf_counter()
        tally = store.finish()
    ended = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    return {"rows_done": rows_done, "rows": tally.rows, "scan_s": scanned - started, "finish_s": ended - scanned,
            "peak_rss_mb": peak / 2**20, "rss_before_mb": base / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.offline_driver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--old", metavar="REV", help="also measure the store of this git revision")
    parser.add_argument("--measure", metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.old)))
        return
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="offline-driver-") as tmp:
            started = time.perf_counter()
            generate(Path(tmp) / "out", rows)
            size = sum(p.stat().st_size for p in (Path(tmp) / "out" / "data").iterdir())
            took = time.perf_counter() - started
            print(f"{rows:,} rows: generated {size / 2**20:.0f} MB in {took:.0f} s", flush=True)
            for which in ([None, args.old] if args.old else [None]):
                work = Path(tmp) / "work"
                shutil.copytree(Path(tmp) / "out", work)
                command = [sys.executable, "-m", "bench.offline_driver", "--measure", str(work)]
                if which:
                    command += ["--old", which]
                result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                label = f"store of {which}" if which else "this store"
                print(f"  {label}: peak RSS {result['peak_rss_mb']:.0f} MB "
                      f"(after imports {result['rss_before_mb']:.0f}), scan {result['scan_s']:.1f} s, "
                      f"finish {result['finish_s']:.1f} s, {result['rows']:,} rows kept", flush=True)  # fmt: skip
                shutil.rmtree(work)


if __name__ == "__main__":
    main()
