"""The supervisor on its own: health reports, the prober, stalls and a batcher's death."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future

import pytest

from server.runtime import ComputeThread
from server.supervision import Supervisor


class Probe:
    """A probe forward pass that fails its first `failures` calls; `reached(n)` is set once called n times."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._waiters: dict[int, asyncio.Event] = {}

    def reached(self, calls: int) -> asyncio.Event:
        return self._waiters.setdefault(calls, asyncio.Event())

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
            calls = self.calls
        if calls in self._waiters:
            self._loop.call_soon_threadsafe(self._waiters[calls].set)
        if calls <= self.failures:
            raise RuntimeError("device still broken")


class Health:
    """Records every reported change; `serving` is set on a report of True."""

    def __init__(self) -> None:
        self.reports: list[bool] = []
        self.serving = asyncio.Event()

    def __call__(self, healthy: bool) -> None:
        self.reports.append(healthy)
        if healthy:
            self.serving.set()


@pytest.fixture
async def compute() -> AsyncIterator[ComputeThread]:
    thread = ComputeThread("test")
    yield thread
    thread.close()


async def test_a_failed_pass_turns_health_off_until_a_probe_succeeds(compute: ComputeThread) -> None:
    probe, health = Probe(failures=2), Health()
    supervisor = Supervisor(compute, probe, 0.001, health)
    supervisor.passed()  # healthy already: nothing to report
    supervisor.failed()
    assert health.reports == [False] and not supervisor.healthy
    await asyncio.wait_for(health.serving.wait(), 60)
    assert health.reports == [False, True] and supervisor.healthy and probe.calls == 3
    await supervisor.close()


async def test_a_stall_refuses_until_the_overdue_pass_returns_and_probes_do_not_end_it_early(
    compute: ComputeThread,
) -> None:
    probe, health = Probe(), Health()
    supervisor = Supervisor(compute, probe, 0.001, health)
    running: Future[None] = Future()
    waiting = asyncio.ensure_future(supervisor.wait_out(running))
    await asyncio.wait_for(probe.reached(3).wait(), 60)  # probes succeed, but the pass is still running
    assert supervisor.stalled and health.reports == [False]
    running.set_exception(RuntimeError("the overdue pass failed in the end"))
    await asyncio.wait_for(waiting, 60)
    assert not supervisor.stalled
    await asyncio.wait_for(health.serving.wait(), 60)
    assert health.reports == [False, True]
    await supervisor.close()


async def test_a_batcher_that_died_stays_unhealthy(compute: ComputeThread, caplog: pytest.LogCaptureFixture) -> None:
    probe, health = Probe(), Health()
    supervisor = Supervisor(compute, probe, 0.001, health)
    supervisor.died(RuntimeError("batcher bug"))
    supervisor.passed()
    supervisor.failed()
    await supervisor.close()
    assert health.reports == [False] and not supervisor.healthy
    assert probe.calls == 0  # nothing to probe for: no prober was started
    assert any("batcher stopped" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


async def test_close_ends_a_prober_that_keeps_failing(compute: ComputeThread) -> None:
    probe, health = Probe(failures=10**9), Health()
    supervisor = Supervisor(compute, probe, 0.001, health)
    supervisor.failed()
    await asyncio.wait_for(probe.reached(2).wait(), 60)
    await asyncio.wait_for(supervisor.close(), 60)
    supervisor.passed()
    assert health.reports == [False]


async def test_without_a_probe_health_comes_back_with_the_next_good_pass(compute: ComputeThread) -> None:
    health = Health()
    supervisor = Supervisor(compute, None, 0.001, health)
    supervisor.failed()
    supervisor.failed()
    supervisor.passed()
    assert health.reports == [False, True]
    await supervisor.close()
