"""Supervision of the inference worker: its health, stalls, and the prober that brings it back.

The batcher reports each forward pass (`passed`, `failed`), a pass that
overran its timeout (`wait_out`) and its own death (`died`); the supervisor
turns these into health changes (`on_health`). While unhealthy, a prober
retries a forward pass on the compute thread until one succeeds; a batcher
that died stays unhealthy, since nothing would serve the images put to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from server.runtime import ComputeThread

log = logging.getLogger(__name__)


class Supervisor:
    """Health and stall state of one batcher's forward passes."""

    def __init__(
        self,
        compute: ComputeThread,
        probe: Callable[[], None] | None,
        probe_interval_s: float,
        on_health: Callable[[bool], None],
    ) -> None:
        self._compute = compute
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self._on_health = on_health
        self._healthy = True
        self._stalled = False
        self._ended = False  # the batcher died or closed: its health no longer changes
        self._prober: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def stalled(self) -> bool:
        """A forward pass overran its timeout and has not returned yet: new images are refused."""
        return self._stalled

    def passed(self) -> None:
        """A forward pass succeeded."""
        self._set(True)

    def failed(self) -> None:
        """A forward pass raised: unhealthy until a probe succeeds."""
        self._set(False)

    async def wait_out(self, running: Future[Any]) -> None:
        """Stalled and unhealthy until the overdue pass `running` returns (a thread cannot be killed)."""
        self._stalled = True
        self._set(False)
        try:
            await asyncio.wrap_future(running)
        except Exception:
            pass
        finally:
            self._stalled = False
        log.warning("the overdue forward pass returned; batching again")

    def died(self, error: BaseException) -> None:
        """The batcher stopped on an unexpected error: logged, and unhealthy for good."""
        log.error("the batcher stopped on an unexpected error: NOT_SERVING", exc_info=error)
        self._ended = True
        self._healthy = False
        self._on_health(False)

    async def close(self) -> None:
        """Stops probing; health changes no more."""
        self._ended = True
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None

    def _set(self, healthy: bool) -> None:
        """Reports changes; while unhealthy, a prober retries a forward pass until one succeeds."""
        if healthy == self._healthy or self._ended:
            return
        self._healthy = healthy
        self._on_health(healthy)
        if not healthy and self._probe is not None and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_healthy(), name="prober")

    async def _probe_until_healthy(self) -> None:
        while not self._healthy and not self._ended:
            try:
                await asyncio.wrap_future(self._compute.submit(self._probe))  # type: ignore[arg-type]
            except Exception as exc:
                log.warning("probe forward pass failed (%s); retrying in %.1f s", type(exc).__name__,
                            self._probe_interval_s)  # fmt: skip
                await asyncio.sleep(self._probe_interval_s)
            else:
                if self._stalled:
                    await asyncio.sleep(self._probe_interval_s)
                else:
                    self._set(True)
