"""The process-level runtime: the compute thread, the OS names of the server's threads, frozen start objects,
and the memory policy (on a clock the test moves)."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from server import runtime
from server.runtime import ComputeThread, MemoryPolicy, freeze_startup_objects, name_os_thread

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux /proc only")


def os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_thread_named_for_the_os_shows_its_name_in_proc() -> None:
    ready, release = threading.Event(), threading.Event()
    native: list[int] = []

    def hold() -> None:
        name_os_thread("decode-7-and-a-long-tail")
        native.append(threading.get_native_id())
        ready.set()
        release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert ready.wait(10)
    try:
        assert os_name(native[0]) == "decode-7-and-a-"  # the kernel keeps 15 bytes
    finally:
        release.set()
        holder.join()


def test_the_compute_thread_runs_every_call_on_one_named_thread() -> None:
    compute = ComputeThread("torch")
    try:
        ids = {compute.run(threading.get_native_id) for _ in range(3)}
        assert len(ids) == 1
        assert os_name(ids.pop()) == "torch-compute"
        assert compute.run(lambda: compute.run(threading.get_ident)) == compute.run(threading.get_ident)
    finally:
        compute.close()


class Node:
    other: Node


def test_frozen_start_objects_are_not_walked_again_and_later_cycles_are_still_collected() -> None:
    alive_at_start = Node()
    try:
        assert freeze_startup_objects() > 0  # (frozen objects freed later leave the count: no equality)
        assert all(obj is not alive_at_start for obj in gc.get_objects())  # out of every generation
        later = Node()
        later.other = later
        collected = weakref.ref(later)
        del later
        gc.collect()
        assert collected() is None
    finally:
        gc.unfreeze()


MB = 1 << 20


@dataclass
class Timer:
    when: float
    callback: Callable[..., object]
    args: tuple[object, ...]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The two loop methods `MemoryPolicy` uses, on a clock that moves only in `advance`."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Timer] = []

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> Timer:
        self.timers.append(Timer(self.now + delay, callback, args))
        return self.timers[-1]

    def run_in_executor(self, _executor: None, fn: Callable[[], object]) -> None:
        fn()

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while due := sorted((t for t in self.timers if not t.cancelled and t.when <= end), key=lambda t: t.when):
            self.timers.remove(due[0])
            self.now = due[0].when
            due[0].callback(*due[0].args)
        self.now = end


@pytest.fixture
def loop() -> FakeLoop:
    return FakeLoop()


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch, loop: FakeLoop) -> list[float]:
    """When (on the fake clock) the policy gave memory back."""
    released: list[float] = []
    monkeypatch.setattr(runtime, "release_memory", lambda: released.append(loop.now))
    return released


def policy(loop: FakeLoop, collect_every_bytes: int = 1 << 40) -> MemoryPolicy:
    return MemoryPolicy(idle_trim_s=1.0, collect_every_bytes=collect_every_bytes, loop=loop)  # type: ignore[arg-type]


def burst_then_light_load(memory: MemoryPolicy, loop: FakeLoop, seconds: int, left: int = 40 * MB) -> None:
    """400 MB in flight for 5 s, then `left` while a 1 MB request a second comes and goes."""
    memory.in_flight(400 * MB)
    loop.advance(5)
    memory.in_flight(left)
    for _ in range(seconds):
        memory.in_flight(left + MB)
        loop.advance(0.5)
        memory.in_flight(left)
        loop.advance(0.5)


def test_memory_goes_back_when_load_falls_to_a_fraction_of_its_peak_though_work_is_still_in_flight(
    loop: FakeLoop, trims: list[float]
) -> None:
    memory = policy(loop)
    burst_then_light_load(memory, loop, seconds=3)
    assert trims == [6.0]  # idle_trim_s after the fall to 40 MB, with requests coming and going


def test_follow_up_trims_come_after_4x_and_16x_the_delay_then_the_peak_starts_over(
    loop: FakeLoop, trims: list[float]
) -> None:
    memory = policy(loop)
    burst_then_light_load(memory, loop, seconds=120, left=0)
    assert trims == [6.0, 10.0, 26.0]  # then the light load is the peak: steady, it keeps its blocks


def test_steady_load_keeps_its_freed_blocks_and_idle_gives_them_back(loop: FakeLoop, trims: list[float]) -> None:
    memory = policy(loop)
    for _ in range(120):  # in flight falls to nothing between requests, for less than idle_trim_s
        memory.received(400 * MB)
        memory.in_flight(400 * MB)
        loop.advance(0.4)
        memory.in_flight(150 * MB)  # between a quarter and half its peak: no change either way
        loop.advance(0.4)
        memory.in_flight(0)
        loop.advance(0.4)
    assert trims == []
    loop.advance(0.6)
    assert trims == [pytest.approx(loop.now)]


def test_load_rising_past_half_its_peak_cancels_the_follow_ups(loop: FakeLoop, trims: list[float]) -> None:
    memory = policy(loop)
    burst_then_light_load(memory, loop, seconds=2)
    assert trims == [6.0]
    memory.in_flight(300 * MB)
    loop.advance(100)
    assert trims == [6.0]


def test_a_request_refused_at_idle_still_leads_to_a_trim(loop: FakeLoop, trims: list[float]) -> None:
    memory = policy(loop)
    loop.advance(100)
    assert trims == []  # nothing came: nothing to give back
    memory.received(100 * MB)
    loop.advance(1)
    assert trims == [101.0]


def test_a_full_collection_per_collect_every_bytes_received(loop: FakeLoop, trims: list[float]) -> None:
    memory = policy(loop, collect_every_bytes=512 * MB)
    memory.in_flight(512 * MB)  # busy: no trim pending
    for _ in range(6):
        memory.received(200 * MB)
    assert trims == [0.0, 0.0]


def test_close_cancels_the_pending_trim_and_arms_no_more(loop: FakeLoop, trims: list[float]) -> None:
    memory = policy(loop)
    memory.in_flight(100 * MB)
    memory.in_flight(0)
    memory.close()
    memory.received(MB)
    memory.in_flight(MB)
    memory.in_flight(0)
    loop.advance(100)
    assert trims == []
