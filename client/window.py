"""How many requests a job keeps at the server: as many as it can answer in time.

A job starts with `window` requests in flight. When the server says it is
busy (a request refused RESOURCE_EXHAUSTED, or images answered
DEADLINE_EXCEEDED because they waited too long in its queue) the window
halves, at most once per round trip and down to one; a window's worth of
answered requests adds one (additive increase, multiplicative decrease, as
TCP's congestion window). A slow
server thus slows the job down instead of stopping it, and a server that
speeds up again gets the whole window back.

`AdaptiveWindow` is the arithmetic; `AsyncGate` (for asyncio) and
`ThreadGate` (for threads) hand out its slots, earliest request first, and
every try of a request, retries included, takes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

WindowListener = Callable[[int, int], None]
"""Told `(size, most)` whenever the number of requests a job may keep in flight changes."""


class AdaptiveWindow:
    """The number of requests a job may have in flight, between 1 and `most`."""

    def __init__(self, most: int, on_change: WindowListener | None = None) -> None:
        if most < 1:
            raise ValueError(f"window must be at least 1, not {most}")
        self.most = most
        self.answers = 0  # requests answered so far: the job is getting somewhere while this grows
        self.size = most
        self._credit = 0  # answers since the window last changed
        self._cut_at = float("-inf")
        self._on_change = on_change

    def answered(self) -> None:
        """A request was answered: after `size` of them the window grows by one, up to `most`."""
        self.answers += 1
        self._credit += 1
        if self._credit >= self.size and self.size < self.most:
            self._set(self.size + 1)

    def busy(self, sent_at: float) -> None:
        """The server was too busy for a request sent at `sent_at` (`time.monotonic()`): halve the window,
        unless it was already halved since that request was sent (one cut per round trip)."""
        if sent_at < self._cut_at:
            return
        self._cut_at = time.monotonic()
        self._set(max(1, self.size // 2))

    def _set(self, size: int) -> None:
        before, self.size, self._credit = self.size, size, 0
        if size != before and self._on_change is not None:
            self._on_change(size, self.most)


class AsyncGate:
    """Slots of an `AdaptiveWindow` for asyncio tasks, lowest priority number first."""

    def __init__(self, window: AdaptiveWindow) -> None:
        self.window = window
        self.in_use = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[float]:
        """Holds a slot for one try; yields the time it was taken (for `AdaptiveWindow.busy`)."""
        if self.in_use < self.window.size and not self._waiting:
            self.in_use += 1
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._order), turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # granted just as it was cancelled
                    self._release()
                else:
                    turn.cancel()
                raise
        try:
            yield time.monotonic()
        finally:
            self._release()

    def answered(self) -> None:
        self.window.answered()
        self._grant()

    def busy(self, sent_at: float) -> None:
        self.window.busy(sent_at)

    def _release(self) -> None:
        self.in_use -= 1
        self._grant()

    def _grant(self) -> None:
        """Hands free slots to the waiting tries (also after the window grew)."""
        while self._waiting and self.in_use < self.window.size:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.cancelled():
                self.in_use += 1
                turn.set_result(None)


class ThreadGate:
    """Slots of an `AdaptiveWindow` for threads, lowest priority number first."""

    def __init__(self, window: AdaptiveWindow) -> None:
        self.window = window
        self.in_use = 0
        self._waiting: list[tuple[int, int]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def slot(self, priority: int) -> Iterator[float]:
        with self._cond:
            ticket = (priority, next(self._order))
            heapq.heappush(self._waiting, ticket)
            self._cond.wait_for(lambda: self._waiting[0] == ticket and self.in_use < self.window.size)
            heapq.heappop(self._waiting)
            self.in_use += 1
            self._cond.notify_all()
        try:
            yield time.monotonic()
        finally:
            with self._cond:
                self.in_use -= 1
                self._cond.notify_all()

    def answered(self) -> None:
        with self._cond:
            self.window.answered()
            self._cond.notify_all()

    def busy(self, sent_at: float) -> None:
        with self._cond:
            self.window.busy(sent_at)
