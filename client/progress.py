"""How a job shows it is alive: a progress bar on a terminal, plain periodic lines elsewhere, or nothing.

The total (for the percentage and the ETA) may come late: inputs are counted
on the side while the job already runs, and the total is filled in when known.
"""

from __future__ import annotations

import os
import time
from typing import IO

from tqdm import tqdm


def duration(seconds: float) -> str:
    """`75` -> `1m15s`; `4000` -> `1h06m`."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Progress:
    """Counts images as they are done. `mode`: "bar" (tqdm), "log" (a line every `every_s`), or "off"."""

    def __init__(self, stream: IO[str], mode: str, every_s: float = 10.0) -> None:
        self.stream = stream
        self.mode = mode
        self.every_s = every_s
        self.done = 0
        self.failed = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar: tqdm | None = None
        if mode == "bar":
            sized = _terminal_has_size(stream)  # a pty of size 0x0 (script, some CI runners) would hide the bar
            self._bar = tqdm(total=None, unit="img", file=stream, dynamic_ncols=sized,
                             ncols=None if sized else 80, nrows=None if sized else 20)  # fmt: skip

    def set_total(self, total: int) -> None:
        """The number of images this run will do, once counted."""
        if self.total == total:
            return
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, done: int, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        if self._bar is not None:
            self._bar.update(done)
            if failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last_line >= self.every_s:
                self._last_line = now
                print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """`1200/5000 images (24.0%), 35.2 images/s, ETA 1m48s, 2 failed`."""
        elapsed = (now or time.monotonic()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = max(0, self.total - self.done)
            eta = f", ETA {duration(left / rate)}" if rate > 0 else ""
            text = f"{self.done}/{self.total} images ({100 * self.done / self.total:.1f}%), {rate:.1f} images/s{eta}"
        else:
            text = f"{self.done} images, {rate:.1f} images/s"
        return text + (f", {self.failed} failed" if self.failed else "")

    def close(self) -> None:
        if self._bar is not None:
            if self._bar.total is None or self._bar.total < self._bar.n:
                self._bar.total = self._bar.n
            self._bar.refresh()
            self._bar.close()
            self._bar = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _terminal_has_size(stream: IO[str]) -> bool:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return size.columns > 0 and size.lines > 0
