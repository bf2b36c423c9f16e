"""Admission: bounded by images and bytes; refuse at once, or wait first come first served."""

from __future__ import annotations

import asyncio

import pytest

from server.admission import Admission, Cost
from server.errors import Overloaded

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
