"""`python -m bench.offline_driver` runs end to end on a small OUT_DIR (no memory figure is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_driver_benchmark_measures_the_store_on_a_generated_out_dir() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.offline_driver", "--rows", "20000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    measured = re.search(r"this store: peak RSS (\d+) MB .* (\d[\d,]*) rows kept", run.stdout)
    assert measured is not None, run.stdout
    assert int(measured.group(1)) > 0 and measured.group(2) == "20,000"  # the repeats were removed, no row lost
