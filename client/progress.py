"""How a job shows it is alive: a progress bar on a terminal, plain periodic lines elsewhere, or nothing.

The total (for the percentage and the ETA) may come late: inputs are counted
on the side while the job already runs, and the total is filled in when known.
`Waiting` says at once when the service refuses requests that will be tried
again (a server down or restarting), and how long they will be; while the
server is only busy (it refuses some requests but answers others) it says
that the job slows down, and the progress line shows how many requests are
in flight.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import IO

from tqdm import tqdm

from client.connection import BUSY_CODES, Retrying
from client.errors import code_name


def duration(seconds: float) -> str:
    """`75` -> `1m15s`; `4000` -> `1h06m`."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Waiting:
    """Told of every retried request (`RetryPolicy.on_retry`); says at once what the job waits for, and how long.

    The first refusal of a spell is said at once, then one line every
    `every_s` while it lasts, and one when answers come again. Called from the
    client's thread; `say` writes a line (the progress bar swaps in its own).
    """

    def __init__(self, stream: IO[str], where: str, every_s: float = 10.0) -> None:
        self.where = where
        self.every_s = every_s
        self.stream = stream
        self.say: Callable[[str], None] = self.print_line
        self.since: float | None = None
        self.window: tuple[int, int] | None = None  # (requests in flight now, most), once it changed
        self._said_at = float("-inf")
        self._answered_at = time.monotonic()
        self._window_said_at = float("-inf")
        self._busy_told = False  # a busy spell was said, and its end not yet
        self._budget: float | None = None
        self._lock = threading.Lock()

    def __call__(self, notice: Retrying) -> None:
        now = time.monotonic()
        if notice.code in BUSY_CODES and now - self._answered_at < self.every_s:
            return  # busy, but answering: `window_changed` says the job slows down
        with self._lock:
            first = self.since is None
            if first:
                self.since = now - notice.waited_s
            self._budget = notice.budget_s
            if not first and now - self._said_at < self.every_s:
                return
            self._said_at = now
            waited = now - self.since  # type: ignore[operator]
        reason = f"{code_name(notice.code)}: {notice.message[:200]}"
        if first:
            budget = f"for up to {notice.budget_s:g} s (--retry-for)" if notice.budget_s is not None else "a few times"
            self.say(f"waiting for {self.where}: {reason}; retrying {budget}")
        else:
            self.say(f"still waiting for {self.where} ({self.status_of(waited)}): {reason}")

    def print_line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def window_changed(self, size: int, most: int) -> None:
        """The job keeps `size` of up to `most` requests in flight now (`RetryPolicy.on_window`)."""
        now = time.monotonic()
        with self._lock:
            was_full = self.window is None or self.window[0] == self.window[1]
            self.window = (size, most)
            if size < most:
                if not was_full or now - self._window_said_at < self.every_s:
                    return
                self._window_said_at, self._busy_told = now, True
            elif not self._busy_told:
                return
            else:
                self._busy_told = False
        if size < most:
            self.say(f"{self.where} is busy: sending {size} of up to {most} requests at once; "
                     "the job slows down and goes on")  # fmt: skip
        else:
            self.say(f"{self.where} keeps up again: {most} requests at once")

    def answered(self) -> None:
        """Results came in: a wait, if there was one, is over."""
        self._answered_at = time.monotonic()
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            waited = time.monotonic() - self.since
            said = self._said_at >= self.since
            self.since = None
        if said:
            self.say(f"{self.where} answers again (after {waited:.0f} s)")

    def status_of(self, waited: float) -> str:
        return f"{waited:.0f} s" + (f" of up to {self._budget:g} s" if self._budget is not None else "")

    def status(self) -> str | None:
        """`waiting for HOST:PORT 32 s of up to 120 s` while a wait lasts; `busy: 2 of 8 requests in flight`
        while the server is busy."""
        since, window = self.since, self.window
        if since is not None:
            return f"waiting for {self.where} {self.status_of(time.monotonic() - since)}"
        if window is not None and window[0] < window[1]:
            return f"busy: {window[0]} of {window[1]} requests in flight"
        return None


class Progress:
    """Counts images as they are done. `mode`: "bar" (tqdm), "log" (a line every `every_s`), or "off"."""

    def __init__(self, stream: IO[str], mode: str, every_s: float = 10.0, waiting: Waiting | None = None) -> None:
        self.stream = stream
        self.mode = mode
        self.every_s = every_s
        self.waiting = waiting
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
            if waiting is not None:
                waiting.say = lambda text: tqdm.write(text, file=stream)

    def set_total(self, total: int) -> None:
        """The number of images this run will do, once counted."""
        if self.total == total:
            return
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, done: int, failed: int = 0) -> None:
        if self.waiting is not None:
            self.waiting.answered()
        self.done += done
        self.failed += failed
        if self._bar is not None:
            self._bar.update(done)
            status = self.waiting.status() if self.waiting is not None else None
            if failed or status or self._bar.postfix:
                shown = [f"failed={self.failed}"] if self.failed else []
                self._bar.set_postfix_str(", ".join(shown + ([status] if status else [])), refresh=False)
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
        waiting = self.waiting.status() if self.waiting is not None else None
        return text + (f", {self.failed} failed" if self.failed else "") + (f", {waiting}" if waiting else "")

    def close(self) -> None:
        if self.waiting is not None:
            self.waiting.say = self.waiting.print_line
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
