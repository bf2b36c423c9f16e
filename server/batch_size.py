"""`--max-batch-size auto`: the batch limit that suits the device, chosen once at start.

- CPU: 16, measured to be the fastest for dinov2-small on the development
  machine (BENCHMARKS.md: batch 32 is slower than 16 there).
- CUDA: measured on the card at start rather than read from a table. The
  service runs on whatever GPU RunPod or the cluster hands out (4 GB to
  80 GB, with different speeds) in bfloat16 or float16 or float32, with
  models from 22M to 1.1B parameters: a table would be a guess for most of
  those, while a measurement costs a quarter of a second per candidate and
  also finds the sizes that do not fit in memory. Candidates double from 16
  to 512 (or halve from 8 when 16 does not fit); the measurement stops at
  the first that runs out of memory or gains less than 5% over the previous
  one, and the limit is the smallest candidate within 5% of the best rate
  (bigger batches than that only add latency and memory). On an H100,
  dinov2-small in bfloat16 measured 16: 1818, 32: 4223, 64: 6577,
  128: 8976, 256: 9944, 512: 10094 images/s and got 256 (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 16
CUDA_CANDIDATES = (16, 32, 64, 128, 256, 512)
ENOUGH_GAIN = 1.05


def parse(value: int | str) -> int | str:
    """A batch-size setting: a positive int, or "auto"."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        value = int(value)  # ValueError for anything else
    if value < 1:
        raise ValueError(f"max_batch_size must be at least 1 or auto, not {value}")
    return value


def choose(rate_of: Callable[[int], float | None], candidates: Iterable[int] = CUDA_CANDIDATES) -> int:
    """The smallest candidate within 5% of the best measured images/s.

    `rate_of(batch_size)` measures images/s, or returns None when the batch
    does not fit (out of memory). Measuring stops at the first candidate that
    does not fit or gains less than 5% over the one before.
    """
    rates: dict[int, float] = {}
    previous = 0.0
    for size in candidates:
        rate = rate_of(size)
        if rate is None:
            break
        rates[size] = rate
        if rate < previous * ENOUGH_GAIN:
            break
        previous = rate
    if not rates:  # a small card and a big model: the largest smaller power of two that fits
        fits = next((size for size in _halving(min(CUDA_CANDIDATES) // 2) if rate_of(size) is not None), None)
        if fits is None:
            raise RuntimeError("not even a batch of one image fits in the device's memory")
        log.warning("max batch size auto: %d (a batch of %d does not fit in memory)", fits, min(CUDA_CANDIDATES))
        return fits
    best = max(rates.values())
    chosen = min(size for size, rate in rates.items() if rate * ENOUGH_GAIN >= best)
    log.info("max batch size auto: %d (images/s by batch size: %s)", chosen,
             ", ".join(f"{size}: {rate:.0f}" for size, rate in rates.items()))  # fmt: skip
    return chosen


def _halving(start: int) -> Iterable[int]:
    while start >= 1:
        yield start
        start //= 2
