"""The batcher on a fake forward function: batch forming, dropping, failures, health."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from server import batcher as batcher_module
from server.batcher import Batcher
from server.errors import DeadlineExceeded, InferenceFailed, Unavailable
from server.metrics import Metrics
from server.model import BatchOutput
from server.runtime import ComputeThread


class FakeModel:
    """Returns each image's first pixel as its 'embedding'; records batch sizes."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[int] = []
        self.seen: list[int] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.lock = threading.Lock()
        self.entered = threading.Event()  # a forward pass began
        self.gate: threading.Event | None = None  # when set up, passes wait for it

    def __call__(self, pixels: list[np.ndarray]) -> BatchOutput:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=60)
        time.sleep(self.delay_s)
        firsts = np.array([image[0, 0] for image in pixels], dtype=np.float32)
        with self.lock:
            self.batches.append(len(pixels))
            self.seen.extend(int(v) for v in firsts)
        if self.fail_on is not None and self.fail_on in firsts:
            raise RuntimeError("boom")
        return BatchOutput(cls=firsts[:, None].copy(), mean=-firsts[:, None].copy())


def image(value: int) -> np.ndarray:
    return np.full((4, 4), value, dtype=np.uint8)


class Collect:
    """A sink for one request's images, as the service's is; `left()` is its caller leaving."""

    def __init__(self, count: int) -> None:
        self.results: dict[int, Any] = {}
        self.count = count
        self.done = asyncio.get_running_loop().create_future()
        self._left = False

    def wanted(self) -> bool:
        return not self._left

    def left(self) -> None:
        self._left = True

    def settle(self, index: int, result: Any) -> None:
        self.results[index] = result
        if len(self.results) == self.count and not self.done.done():
            self.done.set_result(None)


async def held(model: FakeModel, batcher: Batcher) -> asyncio.Future[Any]:
    """Submits one image and returns once the model holds it (until `model.gate` is set)."""
    model.gate = threading.Event()
    busy = asyncio.ensure_future(batcher.submit(image(0)))
    assert await asyncio.to_thread(model.entered.wait, 60)
    return busy


async def until(condition: Callable[[], bool]) -> None:
    """Waits until `condition()` holds, checked between turns of the loop; fails the test after 60 s."""
    async with asyncio.timeout(60):
        while not condition():
            await asyncio.sleep(0.001)


async def started(model: FakeModel, health: list[bool] | None = None, **kwargs: Any) -> Batcher:
    options = {"max_batch_size": 8, "max_wait_ms": 30.0, **kwargs}
    batcher = Batcher(
        model, metrics=Metrics(), probe=lambda: None,
        on_health=(health.append if health is not None else lambda _: None), **options,  # type: ignore[arg-type]
    )  # fmt: skip
    batcher.start()
    return batcher


async def test_concurrent_images_fuse_into_batches_and_keep_their_outputs() -> None:
    model = FakeModel()
    batcher = await started(model)
    outs = await asyncio.gather(*(batcher.submit(image(v)) for v in range(20)))
    assert [float(o.cls[0]) for o in outs] == list(range(20))
    assert [float(o.mean[0]) for o in outs] == [-v for v in range(20)]
    assert model.batches == [8, 8, 4]
    await batcher.close()


class _VirtualClock:
    """`time` for the batcher: stands still until a timed wait of the batcher moves it on (`_VirtualWaits`)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _VirtualWaits:
    """`asyncio` for the batcher, but its timed waits (`timeout`, `sleep`) take no real time: each moves
    `clock` on by its whole delay and runs out at once.

    For a lone image, where nothing else can end a wait early, the image's `queue_s` (its forward pass's
    start less its enqueue time, both on `clock`) is then exactly what the batcher chose to hold it (to float
    rounding): a machine too loaded to run the loop on time adds nothing to it, and a wait the batcher should not
    have taken shows in full.
    """

    def __init__(self, clock: _VirtualClock) -> None:
        self.clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def timeout(self, delay: float | None) -> asyncio.Timeout:
        if delay is not None:
            self.clock.now += delay
        return asyncio.timeout(0 if delay is not None else None)

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.clock.now += delay
        return await asyncio.sleep(0, result)


@pytest.fixture
def virtual_time(monkeypatch: pytest.MonkeyPatch) -> _VirtualClock:
    """The batcher's clock and timed waits in virtual time (`_VirtualWaits`); the test's own are real."""
    clock = _VirtualClock()
    monkeypatch.setattr(batcher_module, "time", clock)
    monkeypatch.setattr(batcher_module, "asyncio", _VirtualWaits(clock))
    return clock


async def test_a_lone_image_waits_at_most_max_wait(virtual_time: _VirtualClock) -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=50.0)
    async with asyncio.timeout(60):  # real time: a batcher that never sends the image fails here
        out = await batcher.submit(image(7))
    assert out.batch_size == 1
    assert out.queue_s == pytest.approx(0.05, abs=1e-9)  # held max_wait for a batch that never fills, no longer
    await batcher.close()


async def test_a_lone_image_is_not_held_back_when_nothing_more_is_coming() -> None:
    model = FakeModel()
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=60_000.0, metrics=Metrics(), coming=lambda: 0)
    batcher.start()
    t0 = time.monotonic()
    out = await batcher.submit(image(7))
    assert time.monotonic() - t0 < 30 and out.batch_size == 1  # not the minute of max_wait
    await batcher.close()


async def test_a_backlog_that_fills_the_batch_is_waited_for_past_max_wait() -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=10.0, backlog_wait_ms=5000.0, coming=lambda: 100)
    first = asyncio.ensure_future(batcher.submit(image(0)))
    await asyncio.sleep(0.2)  # 20 x max_wait: without the backlog rule the first image would have gone alone
    rest = await asyncio.gather(*(batcher.submit(image(v)) for v in range(1, 8)))
    out = await first
    assert model.batches == [8] and out.queue_s >= 0.19 and all(o.batch_size == 8 for o in rest)
    await batcher.close()


@pytest.mark.parametrize(
    ("max_wait_ms", "backlog_wait_ms", "coming", "wait_s"),
    [
        (10.0, 60_000.0, 3, 0.01),  # too few on their way to fill the batch: max_wait only, not the minute
        (0.0, 100.0, 100, 0.1),  # a backlog: waited for up to backlog_wait, not for ever
    ],
    ids=["small-backlog", "bounded"],
)
async def test_a_lone_image_waits_no_longer_than_its_bound(
    virtual_time: _VirtualClock, max_wait_ms: float, backlog_wait_ms: float, coming: int, wait_s: float
) -> None:
    batcher = await started(FakeModel(), max_wait_ms=max_wait_ms, backlog_wait_ms=backlog_wait_ms,
                            coming=lambda: coming)  # fmt: skip
    async with asyncio.timeout(60):  # real time: a batcher that never sends the image fails here
        out = await batcher.submit(image(0))
    assert out.batch_size == 1 and out.queue_s == pytest.approx(wait_s, abs=1e-9)  # its bound exactly
    await batcher.close()


async def test_images_queued_while_the_model_is_busy_form_the_next_batch() -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=0.0)
    first = await held(model, batcher)
    rest = Collect(5)
    batcher.put([(i, image(1 + i)) for i in range(5)], rest, None)
    model.gate.set()  # type: ignore[union-attr]
    await asyncio.wait_for(rest.done, 60)
    await first
    assert model.batches == [1, 5]
    assert all(o.batch_size == 5 for o in rest.results.values())
    await batcher.close()


async def test_cancelled_and_expired_images_never_reach_the_model() -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=0.0)
    busy = await held(model, batcher)
    metrics = batcher._metrics
    cancelled = asyncio.ensure_future(batcher.submit(image(2)))
    expired = asyncio.ensure_future(batcher.submit(image(3), deadline=time.monotonic()))  # passed once queued
    kept = asyncio.ensure_future(batcher.submit(image(4)))
    await until(lambda: metrics.value("dinov2_queue_depth") == 3)
    cancelled.cancel()
    model.gate.set()  # type: ignore[union-attr]
    await busy
    with pytest.raises(DeadlineExceeded):
        await expired
    assert float((await kept).cls[0]) == 4
    assert model.seen == [0, 4]
    assert metrics.value("dinov2_dropped_images_total", {"reason": "cancelled"}) == 1
    assert metrics.value("dinov2_dropped_images_total", {"reason": "deadline"}) == 1
    await batcher.close()


async def test_a_failing_batch_fails_only_its_images_and_the_worker_recovers() -> None:
    model = FakeModel(fail_on=13)
    health: list[bool] = []
    batcher = await started(model, health, max_wait_ms=0.0)
    with pytest.raises(InferenceFailed):
        await batcher.submit(image(13))
    assert float((await batcher.submit(image(5))).cls[0]) == 5
    assert False in health and health[-1] is True
    await batcher.close()


async def test_close_fails_waiting_images_and_refuses_new_ones() -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=0.0)
    busy = await held(model, batcher)
    waiting = asyncio.ensure_future(batcher.submit(image(2)))
    await until(lambda: batcher._metrics.value("dinov2_queue_depth") == 1)
    await batcher.close()
    model.gate.set()  # type: ignore[union-attr]
    for pending in (busy, waiting):
        with pytest.raises(Unavailable):
            await pending
    with pytest.raises(Unavailable):
        await batcher.submit(image(3))


async def test_a_forward_pass_past_its_timeout_fails_its_images_and_turns_health_off_until_it_returns() -> None:
    model = FakeModel()
    health: list[bool] = []
    batcher = await started(model, health, max_wait_ms=0.0, forward_timeout_s=0.3)
    model.gate = threading.Event()  # a stuck device, until the gate opens
    with pytest.raises(Unavailable, match=r"did not finish within 0\.3 s"):
        await batcher.submit(image(1))
    assert health == [False] and batcher.supervisor.stalled
    with pytest.raises(Unavailable, match="stuck"):
        await batcher.submit(image(2))
    model.gate.set()
    await until(lambda: health[-1])
    assert health == [False, True] and not batcher.supervisor.stalled
    assert float((await batcher.submit(image(3))).cls[0]) == 3
    await batcher.close()


async def test_a_batcher_that_dies_is_logged_and_reported_unhealthy(caplog: pytest.LogCaptureFixture) -> None:
    health: list[bool] = []
    model = FakeModel()
    batcher = await started(model, health, max_wait_ms=0.0)
    busy = await held(model, batcher)  # the batcher waits for the next batch in a `_collect` already called

    async def broken(*args: object) -> list[object]:
        raise RuntimeError("batcher bug")

    batcher._collect = broken  # type: ignore[method-assign]
    model.gate.set()  # type: ignore[union-attr]
    answered = await asyncio.gather(busy, batcher.submit(image(2)))  # batches already formed still run
    assert [float(out.cls[0]) for out in answered] == [0, 2]
    await until(lambda: bool(health))
    assert health == [False]
    assert any("batcher stopped" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    with pytest.raises(Unavailable, match="not running"):
        await batcher.submit(image(3))
    await batcher.close()


async def test_images_whose_caller_left_do_not_fill_a_batch() -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=0.0)
    busy = await held(model, batcher)
    gone, kept = Collect(6), Collect(8)
    batcher.put([(i, image(10 + i)) for i in range(6)], gone, None)
    gone.left()  # its images are still queued, in front of the next caller's
    batcher.put([(i, image(20 + i)) for i in range(8)], kept, None)
    model.gate.set()  # type: ignore[union-attr]
    await asyncio.wait_for(kept.done, 60)
    await busy
    assert model.batches == [1, 8]  # the next batch is full of live images, not 2 behind 6 gone
    assert model.seen == [0, *range(20, 28)]
    assert batcher._metrics.value("dinov2_dropped_images_total", {"reason": "cancelled"}) == 6
    await batcher.close()


async def test_discard_takes_a_callers_images_out_of_the_queue_at_once() -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=0.0, max_batch_size=16)
    busy = await held(model, batcher)
    gone, kept = Collect(6), Collect(3)
    batcher.put([(i, image(10 + i)) for i in range(6)], gone, None)
    batcher.put([(i, image(20 + i)) for i in range(3)], kept, None)
    assert batcher.discard(gone, "deadline") == 6
    metrics = batcher._metrics
    assert metrics.value("dinov2_queue_depth") == 3  # the queue counts live images only, at once
    assert metrics.value("dinov2_dropped_images_total", {"reason": "deadline"}) == 6
    model.gate.set()  # type: ignore[union-attr]
    await asyncio.wait_for(kept.done, 60)
    await busy
    assert model.batches == [1, 3] and not gone.results
    await batcher.close()


async def test_every_forward_pass_is_timed_by_its_batch_size() -> None:
    model = FakeModel()
    batcher = await started(model, max_wait_ms=0.0)
    busy = await held(model, batcher)
    rest = Collect(5)
    batcher.put([(i, image(i)) for i in range(5)], rest, None)
    model.gate.set()  # type: ignore[union-attr]
    await asyncio.wait_for(rest.done, 60)
    await busy
    assert model.batches == [1, 5]
    assert batcher.forward_times.batch_seconds(1) is not None
    assert batcher.forward_times._seconds.keys() == {1, 5}
    await batcher.close()


class _HeldUpClock:
    """`time` for the batcher: real monotonic time plus seconds the test says the loop was held up."""

    def __init__(self) -> None:
        self.held_up_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.held_up_s


async def test_a_forward_pass_is_timed_where_it_runs_not_by_an_event_loop_held_up_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _HeldUpClock()
    monkeypatch.setattr(batcher_module, "time", clock)
    compute = ComputeThread("test-forward")
    model = FakeModel()
    batcher = await started(model, max_wait_ms=0.0, compute=compute)
    busy = await held(model, batcher)
    model.gate.set()  # type: ignore[union-attr]
    compute.submit(lambda: None).result(timeout=60)  # on the loop: the pass is over, its answer not read yet
    clock.held_up_s = 100.0  # the loop was busy this long (a large request parsed) before it read the answer
    assert (await busy).cls[0] == 0
    assert batcher.forward_times.batch_seconds(1) < 100.0  # old: timed on the loop, so 100 s and more
    await batcher.close()
    compute.close()
