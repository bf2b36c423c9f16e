"""Receive slots: request bodies read at once, in all and per caller, with a bounded wait for one.

A body costs memory as it arrives, so only `max_receiving_requests` are read
at once (gRPC's unary `Embed` and HTTP together); the others wait unread in
their sockets. Slots go to bodies that arrive: one caller holds at most
`max_receiving_per_caller` of them (so a caller's slow uploads cannot take
them all), and a wait for a slot ends at the request's deadline or after
`max_queue_s`, refused `Overloaded` rather than queued without end. Waiting
callers are served in arrival order, skipping those already at their share.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.errors import Overloaded

RETRY_AFTER_S = 1.0
"""A refused wait's Retry-After: slots turn over within seconds (a body is read within receive_timeout_s)."""


@dataclass(eq=False)
class _Waiter:
    caller: str
    turn: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ReceiveSlots:
    """`total` bodies read at once, `per_caller` of them for one caller; `slot(caller, deadline)` holds one."""

    def __init__(self, total: int, per_caller: int, on_refused: Callable[[], None] = lambda: None) -> None:
        self.total = total
        self._on_refused = on_refused
        self.per_caller = min(per_caller, total)
        self.held = 0
        self._by_caller: collections.Counter[str] = collections.Counter()
        self._waiting: collections.deque[_Waiter] = collections.deque()

    def held_by(self, caller: str) -> int:
        return self._by_caller[caller]

    @contextlib.asynccontextmanager
    async def slot(self, caller: str, deadline: float) -> AsyncIterator[None]:
        """Holds a slot for `caller` while the block runs; waits until `deadline` (a `time.monotonic()`
        instant) for one, then raises `Overloaded`."""
        await self._acquire(caller, deadline)
        try:
            yield
        finally:
            self._release(caller)

    def _free_for(self, caller: str) -> bool:
        return self.held < self.total and self._by_caller[caller] < self.per_caller

    async def _acquire(self, caller: str, deadline: float) -> None:
        if self._free_for(caller):  # a waiter under its share never waits while a slot is free (`_hand_over`)
            self._take(caller)
            return
        waiter = _Waiter(caller)
        self._waiting.append(waiter)
        waited_from = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, deadline - waited_from)):
                await waiter.turn
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter.turn.done() and not waiter.turn.cancelled():  # given a slot just as it stopped waiting
                self._release(caller)
            else:
                self._waiting.remove(waiter)
            if isinstance(exc, TimeoutError):
                self._on_refused()
                raise Overloaded(
                    f"no receive slot for this request body within {time.monotonic() - waited_from:.1f} s "
                    f"({self.held} bodies being read, {self._by_caller[caller]} of them this caller's; bounds "
                    f"{self.total} and {self.per_caller} per caller): retry with backoff",
                    reason="receive",
                    retry_after_s=RETRY_AFTER_S,
                ) from None
            raise

    def _take(self, caller: str) -> None:
        self.held += 1
        self._by_caller[caller] += 1

    def _release(self, caller: str) -> None:
        self.held -= 1
        self._by_caller[caller] -= 1
        if self._by_caller[caller] <= 0:
            del self._by_caller[caller]
        self._hand_over()

    def _hand_over(self) -> None:
        """Gives free slots to the earliest waiters under their share."""
        for waiter in list(self._waiting):
            if self.held >= self.total:
                return
            if self._free_for(waiter.caller):
                self._waiting.remove(waiter)
                self._take(waiter.caller)
                waiter.turn.set_result(None)
