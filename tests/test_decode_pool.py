"""The decode pool: order and per-image errors kept, chunks handed back, calls take turns, cancelled work dropped."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from server.decode.pool import DecodePool, Lane
from server.errors import Internal, InvalidImage


def fake_decode(data: bytes) -> np.ndarray:
    """b"ok:N" -> a 2x2 array of N; b"bad" -> InvalidImage; b"boom" -> an unexpected error; b"slow" and
    b"gate" take 50 ms (an image's cost, which sizes its lane's next chunks)."""
    if data == b"bad":
        raise InvalidImage("not an image")
    if data == b"boom":
        raise RuntimeError("a bug")
    if data.startswith((b"slow", b"gate")):
        time.sleep(0.05)
    return np.full((2, 2), int(data.split(b":")[1]), dtype=np.uint8)


class Gate:
    """A decode whose b"gate:N" images wait until the test opens the gate; `entered` says one is waiting."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.decoded: list[bytes] = []

    def __call__(self, data: bytes) -> np.ndarray:
        self.decoded.append(data)
        if data.startswith(b"gate"):
            self.entered.set()
            assert self.opened.wait(timeout=60)
        return fake_decode(data)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 60), "no worker reached the gate"


async def until(condition: Callable[[], bool], within_s: float = 30) -> None:
    """Polls an observable condition (never a fixed sleep): fails if it does not hold within `within_s`."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def decode_all(pool: DecodePool, images: list[bytes]) -> tuple[list[object], int]:
    """Every result in input order, and how many chunks they came back in."""
    results: list[object] = [None] * len(images)
    chunks = 0
    done = asyncio.Event()

    def deliver(start: int, chunk: list[object]) -> None:
        nonlocal chunks
        chunks += 1
        results[start : start + len(chunk)] = chunk
        if all(r is not None for r in results):
            done.set()

    pool.submit(images, deliver)
    await asyncio.wait_for(done.wait(), timeout=30)
    return results, chunks


async def test_results_keep_their_order_and_their_own_errors() -> None:
    pool = DecodePool.in_threads(fake_decode, workers=2)
    images = [f"ok:{i}".encode() for i in range(200)]
    images[5], images[77] = b"bad", b"boom"
    results, chunks = await decode_all(pool, images)
    pool.close()
    assert isinstance(results[5], InvalidImage) and str(results[5]) == "not an image"
    assert isinstance(results[77], Internal) and "a bug" not in str(results[77])
    for index, result in enumerate(results):
        if index not in (5, 77):
            assert int(result[0, 0]) == index  # type: ignore[index]
    assert chunks < len(images) / 4, f"{chunks} chunks for {len(images)} cheap images"


async def test_refused_images_carry_no_traceback() -> None:
    pool = DecodePool.in_threads(fake_decode, workers=1)
    results, _ = await decode_all(pool, [b"bad", b"boom"])
    pool.close()
    assert all(r.__traceback__ is None and r.__context__ is None for r in results)  # type: ignore[union-attr]


async def test_calls_take_turns_so_a_big_call_does_not_hold_every_worker() -> None:
    gate = Gate()
    pool = DecodePool.in_threads(gate, workers=1)
    order: list[str] = []
    big_done, small_done = asyncio.Event(), asyncio.Event()
    big = [b"gate:1"] + [b"slow:1"] * 39

    def on_big(start: int, chunk: list[object]) -> None:
        order.extend("big" for _ in chunk)
        if order.count("big") == len(big):
            big_done.set()

    pool.submit(big, on_big)
    await gate.wait_entered()  # the big call is being decoded
    pool.submit([b"ok:1"], lambda start, chunk: (order.append("small"), small_done.set()))
    gate.opened.set()
    await asyncio.wait_for(small_done.wait(), timeout=10)
    assert order.count("big") < 15, f"the small call waited for {order.count('big')} of the big call's images"
    await asyncio.wait_for(big_done.wait(), timeout=30)
    pool.close()


async def test_a_lanes_requests_go_in_order_and_share_one_turn_with_other_callers() -> None:
    gate = Gate()
    pool = DecodePool.in_threads(gate, workers=1)
    order: list[str] = []
    finished = asyncio.Event()

    def record(name: str, size: int) -> Callable[[int, list[object]], None]:
        def deliver(start: int, chunk: list[object]) -> None:
            order.extend(name for _ in chunk)
            if name == "other" and order.count(name) == size:
                finished.set()

        return deliver

    stream = Lane()
    pool.submit([b"gate:1"] + [b"slow:1"] * 3, record("request0", 4), stream)
    for n in range(1, 3):
        pool.submit([b"slow:1"] * 4, record(f"request{n}", 4), stream)
    await gate.wait_entered()  # the stream's first image is being decoded
    pool.submit([b"slow:1"] * 4, record("other", 4))
    gate.opened.set()
    await asyncio.wait_for(finished.wait(), timeout=10)
    stream_order = [name for name in order if name != "other"]
    assert stream_order == sorted(stream_order), "a stream's requests were decoded out of order"
    assert len(stream_order) < 12, "the other caller waited for the whole stream, not for one turn"
    pool.close()


async def test_a_cancelled_call_drops_its_queued_images() -> None:
    gate = Gate()
    pool = DecodePool.in_threads(gate, workers=1)
    delivered: list[object] = []
    job = pool.submit([b"gate:1"] + [b"ok:1"] * 99, lambda start, chunk: delivered.extend(chunk))
    await gate.wait_entered()
    dropped = pool.cancel(job)
    gate.opened.set()
    await until(lambda: pool.pending == 0)
    assert dropped == 99 and gate.decoded == [b"gate:1"] and delivered == []
    pool.close()


@pytest.mark.parametrize("workers", [1, 3])
async def test_pending_counts_images_not_yet_handed_back(workers: int) -> None:
    pool = DecodePool.in_threads(fake_decode, workers=workers)
    release = asyncio.Event()
    delivered: list[object] = []

    def deliver(start: int, chunk: list[object]) -> None:
        delivered.extend(chunk)
        if len(delivered) == 10:
            release.set()

    pool.submit([b"slow:1"] * 10, deliver)
    assert pool.pending > 0
    await asyncio.wait_for(release.wait(), timeout=30)
    assert pool.pending == 0
    pool.close()


async def test_a_chunk_stays_pending_until_it_reaches_the_caller() -> None:
    """The batcher flushes early when nothing is pending: decoded images on their way must count."""
    pool = DecodePool.in_threads(fake_decode, workers=1)
    pending_at_delivery: list[int] = []
    delivered = asyncio.Event()
    handed_back = threading.Event()
    hand_back = pool._hand_back

    def spy(*args: Any) -> None:
        hand_back(*args)
        handed_back.set()

    def deliver(start: int, chunk: list[object]) -> None:
        pending_at_delivery.append(pool.pending)
        delivered.set()

    pool._hand_back = spy  # type: ignore[method-assign]
    pool.submit([b"ok:1"], deliver)
    assert handed_back.wait(timeout=60)  # the event loop is blocked here while the chunk is handed back
    assert pool.pending == 1 and not delivered.is_set()
    await asyncio.wait_for(delivered.wait(), timeout=10)
    assert pending_at_delivery == [0]
    pool.close()


@pytest.mark.parametrize("cancelled", [False, True])
async def test_a_worker_waiting_for_work_keeps_no_request_alive(cancelled: bool) -> None:
    gate = Gate()
    pool = DecodePool.in_threads(gate, workers=1)
    delivered = asyncio.Event()
    job = pool.submit(
        [b"gate:1", b"ok:2", b"ok:3"], lambda start, chunk: delivered.set() if start + len(chunk) == 3 else None
    )
    await gate.wait_entered()
    if cancelled:
        pool.cancel(job)
    gate.opened.set()
    if not cancelled:
        await asyncio.wait_for(delivered.wait(), timeout=30)
    await until(lambda: pool.pending == 0)
    gone = weakref.ref(job)
    del job
    await until(lambda: gone() is None)  # the worker thread is back waiting for the next job
    pool.close()


async def test_cancelling_after_close_is_harmless() -> None:
    gate = Gate()
    pool = DecodePool.in_threads(gate, workers=1)
    pool.submit([b"gate:1"], lambda start, chunk: None)
    await gate.wait_entered()
    queued = pool.submit([b"ok:1"], lambda start, chunk: None)
    pool.close()
    assert pool.cancel(queued) == 1
    gate.opened.set()
