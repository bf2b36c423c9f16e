"""Admission: the bound on images accepted and not yet answered.

Callers that can retry elsewhere (gRPC) are refused at once when the bound is
reached; callers that have nowhere better to go (a RunPod job this worker has
already taken) wait their turn, first come first served.
"""

from __future__ import annotations

import asyncio
import collections

from server.errors import Overloaded


class Admission:
    """Counts images in flight against `bound`; refuse with `try_acquire`, or wait with `acquire`."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.in_flight = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def try_acquire(self, count: int) -> None:
        """Admits `count` images now, or raises `Overloaded`."""
        if self._waiting or self.in_flight + count > self.bound:
            raise Overloaded(
                f"server is at capacity ({self.in_flight} images in flight, bound {self.bound}); retry with backoff"
            )
        self.in_flight += count

    async def acquire(self, count: int) -> None:
        """Waits until `count` images fit, behind those already waiting; `Overloaded` if they never can."""
        if count > self.bound:
            raise Overloaded(f"{count} images can never fit the server's bound of {self.bound} in flight")
        if not self._waiting and self.in_flight + count <= self.bound:
            self.in_flight += count
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((count, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # admitted just as it was cancelled
                self.release(count)
            else:
                self._admit_waiting()
            raise

    def release(self, count: int) -> None:
        self.in_flight -= count
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting:
            count, turn = self._waiting[0]
            if turn.cancelled():
                self._waiting.popleft()
                continue
            if self.in_flight + count > self.bound:
                return
            self._waiting.popleft()
            self.in_flight += count
            turn.set_result(None)
