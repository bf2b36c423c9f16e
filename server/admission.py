"""Admission: the bound on what accepted, not yet answered work may cost.

Work costs images (queue slots) and encoded bytes (memory held until the
answer). Callers that can retry elsewhere (gRPC) are refused at once when
either bound would be passed; callers that have nowhere better to go (a
RunPod job this worker has already taken) wait their turn, first come first
served.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from server.errors import Overloaded


@dataclass(frozen=True)
class Cost:
    images: int
    nbytes: int


class Admission:
    """Counts images and bytes in flight against their bounds; refuse with `try_acquire`, or wait with `acquire`."""

    def __init__(self, max_images: int, max_bytes: int) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.images = 0
        self.nbytes = 0
        self._waiting: collections.deque[tuple[Cost, asyncio.Future[None]]] = collections.deque()

    def _fits(self, cost: Cost) -> bool:
        return self.images + cost.images <= self.max_images and self.nbytes + cost.nbytes <= self.max_bytes

    def try_acquire(self, cost: Cost) -> None:
        """Admits `cost` now, or raises `Overloaded`."""
        if self._waiting or not self._fits(cost):
            raise Overloaded(
                f"server is at capacity ({self.images} images, {self.nbytes} bytes in flight; bounds "
                f"{self.max_images} images, {self.max_bytes} bytes); retry with backoff"
            )
        self._take(cost)

    async def acquire(self, cost: Cost) -> None:
        """Waits until `cost` fits, behind those already waiting; `Overloaded` if it never can."""
        if cost.images > self.max_images or cost.nbytes > self.max_bytes:
            raise Overloaded(
                f"{cost.images} images of {cost.nbytes} bytes can never fit the server's bounds "
                f"({self.max_images} images, {self.max_bytes} bytes in flight)"
            )
        if not self._waiting and self._fits(cost):
            self._take(cost)
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((cost, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # admitted just as it was cancelled
                self.release(cost)
            else:
                self._admit_waiting()
            raise

    def release(self, cost: Cost) -> None:
        self.images -= cost.images
        self.nbytes -= cost.nbytes
        self._admit_waiting()

    def _take(self, cost: Cost) -> None:
        self.images += cost.images
        self.nbytes += cost.nbytes

    def _admit_waiting(self) -> None:
        while self._waiting:
            cost, turn = self._waiting[0]
            if turn.cancelled():
                self._waiting.popleft()
                continue
            if not self._fits(cost):
                return
            self._waiting.popleft()
            self._take(cost)
            turn.set_result(None)
