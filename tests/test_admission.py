"""Admission: refuse at once, or wait first come first served; nothing leaks on cancellation."""

from __future__ import annotations

import asyncio

import pytest

from server.admission import Admission
from server.errors import Overloaded


def test_try_acquire_refuses_past_the_bound() -> None:
    admission = Admission(4)
    admission.try_acquire(3)
    with pytest.raises(Overloaded, match="3 images in flight, bound 4"):
        admission.try_acquire(2)
    admission.try_acquire(1)
    admission.release(4)
    assert admission.in_flight == 0


async def test_waiters_are_first_come_and_survive_cancellation() -> None:
    admission = Admission(4)
    order: list[str] = []
    release = asyncio.Event()

    async def job(name: str, count: int) -> None:
        await admission.acquire(count)
        try:
            order.append(name)
            await release.wait()
        finally:
            admission.release(count)

    first = asyncio.ensure_future(job("a", 3))
    await asyncio.sleep(0)
    blocked = asyncio.ensure_future(job("b", 3))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(job("c", 1))
    await asyncio.sleep(0)
    assert order == ["a"]  # c fits, but waits behind b
    with pytest.raises(Overloaded):
        admission.try_acquire(1)  # and so does a caller that would rather be refused
    blocked.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert blocked.cancelled()
    assert order == ["a", "c"]
    release.set()
    await asyncio.gather(first, small)
    assert admission.in_flight == 0
    await asyncio.wait_for(admission.acquire(4), timeout=5)


async def test_a_request_larger_than_the_bound_is_refused_not_parked() -> None:
    with pytest.raises(Overloaded, match="can never fit"):
        await Admission(4).acquire(5)
