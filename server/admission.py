"""Admission: accepted work is work the server can finish in time.

Work costs images (queue slots), encoded bytes (memory held until the answer)
and time. A request is refused when it would pass the bound on images or
bytes in flight, when it would wait longer than `max_queue_s` behind the work
already accepted, at the engine's measured speed, or when it would be
answered after its deadline (server/throughput.py estimates both). A request with
nothing ahead of it is never refused for time: waiting is not what would
make it late. Callers that can retry elsewhere (gRPC) are refused at once,
with the estimated wait; callers that have nowhere better to go (a RunPod job
this worker has already taken) wait their turn, first come first served, up
to their deadline.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import Overloaded
from server.throughput import Estimate

SAFETY = 1.25
"""A deadline must leave this many times the estimated wait: the speed moves (a busy machine, a slow image)."""

Clock = Callable[[int, int], Estimate | None]
"""(images accepted and not yet answered, images of a new request) -> how long until that request is answered."""


@dataclass(frozen=True)
class Cost:
    images: int
    nbytes: int


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


class Admission:
    """Counts images and bytes in flight against their bounds; refuse with `try_acquire`, or wait with `acquire`."""

    def __init__(
        self, max_images: int, max_bytes: int, max_queue_s: float = float("inf"), clock: Clock = lambda _a, _n: None
    ) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.max_queue_s = max_queue_s
        self.clock = clock
        self.images = 0
        self.nbytes = 0
        self._waiting: collections.deque[tuple[Cost, asyncio.Future[None]]] = collections.deque()

    def _fits(self, cost: Cost) -> bool:
        return self.images + cost.images <= self.max_images and self.nbytes + cost.nbytes <= self.max_bytes

    def queued_seconds(self) -> float:
        """How long the work accepted now will take (0 before the engine's speed is known)."""
        estimate = self.clock(self.images, 0)
        return 0.0 if estimate is None else estimate.seconds

    def try_acquire(self, cost: Cost, deadline: float | None = None) -> None:
        """Admits `cost` now, or raises `Overloaded` saying which bound and, for time, the estimated wait.

        `deadline` is a `time.monotonic()` instant by which the request must be answered.
        """
        if self._waiting or not self._fits(cost):
            raise Overloaded(
                f"server is at capacity ({self.images} images, {self.nbytes} bytes in flight; bounds "
                f"{self.max_images} images, {self.max_bytes} bytes); retry with backoff",
                reason="images" if self.images + cost.images > self.max_images else "bytes",
                retry_after_s=self.queued_seconds() or None,
            )
        if self.images:
            self._check_time(cost, deadline)
        self._take(cost)

    def _check_time(self, cost: Cost, deadline: float | None) -> None:
        total = self.clock(self.images, cost.images)
        if total is None:
            return
        if total.wait > self.max_queue_s:
            raise Overloaded(
                f"server is busy: this request would wait about {_seconds(total.wait)} s behind the work ahead of "
                f"it ({self.images} images, at about {total.rate:.3g} images/s), over its bound of "
                f"{self.max_queue_s:g} s; retry with backoff or on another server",
                reason="queue_time",
                retry_after_s=total.wait - self.max_queue_s,
            )
        left = float("inf") if deadline is None else deadline - time.monotonic()
        if SAFETY * total.seconds > left:
            raise Overloaded(
                f"server is busy: this request would be answered in about {_seconds(total.seconds)} s "
                f"({self.images} images ahead of it, {cost.images} in it, at about {total.rate:.3g} images/s), "
                f"after its deadline ({_seconds(max(left, 0.0))} s from now); retry with backoff or on another server",
                reason="deadline",
                retry_after_s=total.wait,
            )

    async def acquire(self, cost: Cost, deadline: float | None = None) -> None:
        """Waits until `cost` fits, behind those already waiting; `Overloaded` if it never can,
        or when `deadline` (a `time.monotonic()` instant) passes first."""
        if cost.images > self.max_images or cost.nbytes > self.max_bytes:
            raise Overloaded(
                f"{cost.images} images of {cost.nbytes} bytes can never fit the server's bounds "
                f"({self.max_images} images, {self.max_bytes} bytes in flight)",
                reason="images" if cost.images > self.max_images else "bytes",
            )
        if not self._waiting and self._fits(cost):
            self._take(cost)
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append((cost, turn))
        waited_from = time.monotonic()
        try:
            async with asyncio.timeout_at(None if deadline is None else loop.time() + deadline - time.monotonic()):
                await turn
        except (asyncio.CancelledError, TimeoutError) as exc:
            if turn.done() and not turn.cancelled():  # admitted just as it was cancelled
                self.release(cost)
            else:
                turn.cancel()
                self._admit_waiting()
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"no capacity for {cost.images} images within {_seconds(time.monotonic() - waited_from)} s "
                    f"({self.images} images, {self.nbytes} bytes in flight); retry later",
                    reason="wait",
                ) from None
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
