"""Admission: bounded by images, bytes and time; refuse at once, or wait first come first served."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from server.admission import SAFETY, Admission, Cost
from server.errors import Overloaded
from server.throughput import Estimate

MB = 1 << 20


def images(count: int, nbytes: int = 0) -> Cost:
    return Cost(count, nbytes)


def test_try_acquire_refuses_past_the_image_bound() -> None:
    admission = Admission(4, 100 * MB)
    admission.try_acquire(images(3))
    with pytest.raises(Overloaded, match="3 images, 0 bytes in flight"):
        admission.try_acquire(images(2))
    admission.try_acquire(images(1))
    admission.release(images(4))
    assert admission.images == 0


def test_try_acquire_refuses_past_the_byte_bound_whatever_the_image_count() -> None:
    admission = Admission(1000, 64 * MB)
    admission.try_acquire(images(1, 40 * MB))
    with pytest.raises(Overloaded, match=f"bounds 1000 images, {64 * MB} bytes"):
        admission.try_acquire(images(1, 30 * MB))
    admission.try_acquire(images(10, 24 * MB))
    admission.release(images(1, 40 * MB))
    admission.release(images(10, 24 * MB))
    assert (admission.images, admission.nbytes) == (0, 0)


async def test_waiters_are_first_come_and_survive_cancellation() -> None:
    admission = Admission(4, 100 * MB)
    order: list[str] = []
    release = asyncio.Event()

    async def job(name: str, count: int) -> None:
        await admission.acquire(images(count))
        try:
            order.append(name)
            await release.wait()
        finally:
            admission.release(images(count))

    first = asyncio.ensure_future(job("a", 3))
    await asyncio.sleep(0)
    blocked = asyncio.ensure_future(job("b", 3))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(job("c", 1))
    await asyncio.sleep(0)
    assert order == ["a"]  # c fits, but waits behind b
    with pytest.raises(Overloaded):
        admission.try_acquire(images(1))  # and so does a caller that would rather be refused
    blocked.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert blocked.cancelled()
    assert order == ["a", "c"]
    release.set()
    await asyncio.gather(first, small)
    assert admission.images == 0
    await asyncio.wait_for(admission.acquire(images(4)), timeout=5)


async def test_a_waiter_for_bytes_is_admitted_when_bytes_are_released() -> None:
    admission = Admission(100, 10 * MB)
    admission.try_acquire(images(1, 8 * MB))
    waiter = asyncio.ensure_future(admission.acquire(images(1, 5 * MB)))
    await asyncio.sleep(0)
    assert not waiter.done()
    admission.release(images(1, 8 * MB))
    await asyncio.wait_for(waiter, timeout=5)
    assert (admission.images, admission.nbytes) == (1, 5 * MB)


@pytest.mark.parametrize("cost", [images(5), images(1, 11 * MB)])
async def test_a_request_larger_than_a_bound_is_refused_not_parked(cost: Cost) -> None:
    with pytest.raises(Overloaded, match="can never fit"):
        await Admission(4, 10 * MB).acquire(cost)


def clock(seconds_per_image: float) -> Any:
    """An engine clock at a fixed speed: (images ahead, images of the new request) -> estimate."""

    def estimate(ahead: int, own: int) -> Estimate:
        return Estimate(ahead + own, (ahead + own) * seconds_per_image, own * seconds_per_image)

    return estimate


def test_a_request_that_would_wait_longer_than_max_queue_s_is_refused_with_the_estimate() -> None:
    admission = Admission(1000, 100 * MB, max_queue_s=10.0, clock=clock(0.5))
    admission.try_acquire(images(18))  # 9 s of work: under the bound
    admission.try_acquire(images(4))  # 11 s now, but the bound is on the wait behind the work ahead
    with pytest.raises(Overloaded, match=r"would wait about 11 s behind the work ahead of it \(22 images, at ") as info:
        admission.try_acquire(images(1))
    assert info.value.reason == "queue_time" and admission.images == 22
    assert admission.queued_seconds() == 11.0


def test_a_request_that_would_miss_its_deadline_is_refused_at_once_with_the_estimated_wait() -> None:
    admission = Admission(1000, 100 * MB, clock=clock(1.0))
    admission.try_acquire(images(30), deadline=None)
    with pytest.raises(Overloaded, match=r"answered in about 40 s \(30 images ahead of it, 10 in it") as info:
        admission.try_acquire(images(10), deadline=time.monotonic() + 45)  # 40 s x SAFETY > 45 s
    assert info.value.reason == "deadline" and info.value.retry_after_s == 30.0  # the work ahead of it
    admission.try_acquire(images(10), deadline=time.monotonic() + 40 * SAFETY + 5)
    assert admission.images == 40


def test_a_refusal_at_capacity_says_how_long_the_work_accepted_will_take() -> None:
    admission = Admission(4, 100 * MB, clock=clock(2.0))
    admission.try_acquire(images(4))
    with pytest.raises(Overloaded) as info:
        admission.try_acquire(images(1))
    assert info.value.reason == "images" and info.value.retry_after_s == 8.0
    unknown = Admission(4, 100 * MB)  # no speed measured yet: no wait to tell (HTTP then says 1 s)
    unknown.try_acquire(images(4))
    with pytest.raises(Overloaded) as info:
        unknown.try_acquire(images(1))
    assert info.value.retry_after_s is None


def test_a_request_with_nothing_ahead_is_never_refused_for_time() -> None:
    admission = Admission(1000, 100 * MB, max_queue_s=1.0, clock=clock(10.0))
    admission.try_acquire(images(5), deadline=time.monotonic() + 1)  # 50 s of its own work
    assert admission.images == 5


async def test_a_waiter_whose_deadline_passes_is_refused_and_leaves_the_line() -> None:
    admission = Admission(4, 100 * MB)
    admission.try_acquire(images(4))
    with pytest.raises(Overloaded, match="no capacity for 2 images within") as info:
        await admission.acquire(images(2), deadline=time.monotonic() + 0.05)
    assert info.value.reason == "wait"
    admission.release(images(4))
    admission.try_acquire(images(4))  # nobody is left waiting in front
    assert admission.images == 4
