"""Receive slots: a share per caller, arrival order, and a wait that ends refused at its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from server.errors import Overloaded
from server.receive_slots import ReceiveSlots

LONG = 3600.0  # a deadline no test reaches


def later(seconds: float = LONG) -> float:
    return time.monotonic() + seconds


@contextlib.asynccontextmanager
async def holding(slots: ReceiveSlots, caller: str) -> AsyncIterator[asyncio.Event]:
    """A task holding a slot of `caller` until the event is set."""
    release, held = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with slots.slot(caller, later()):
            held.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await held.wait()
    try:
        yield release
    finally:
        release.set()
        await task


async def test_one_caller_holds_at_most_its_share_and_others_get_the_rest() -> None:
    slots = ReceiveSlots(total=4, per_caller=2)
    async with holding(slots, "a"), holding(slots, "a") as release_second:
        third = asyncio.create_task(_take(slots, "a"))
        async with holding(slots, "b"), holding(slots, "c"):
            assert slots.held == 4 and slots.held_by("a") == 2
        await asyncio.sleep(0)
        assert not third.done() and slots.held == 2  # two slots free, but "a" is at its share
        release_second.set()
        await asyncio.wait_for(third, LONG)
    assert slots.held == 0


async def _take(slots: ReceiveSlots, caller: str) -> None:
    async with slots.slot(caller, later()):
        pass


async def test_a_caller_at_its_share_is_skipped_and_the_next_waiter_served() -> None:
    slots = ReceiveSlots(total=2, per_caller=1)
    async with holding(slots, "a") as release_a:
        async with holding(slots, "b") as release_b:
            again_a = asyncio.create_task(_take(slots, "a"))
            then_c = asyncio.create_task(_take(slots, "c"))
            await asyncio.sleep(0)
            release_b.set()  # "a" waits first but is at its share: "c" gets b's slot
            await asyncio.wait_for(then_c, LONG)
            assert not again_a.done() and slots.held_by("a") == 1
        release_a.set()
        await asyncio.wait_for(again_a, LONG)
    assert slots.held == 0


async def test_a_wait_past_its_deadline_is_refused_with_a_retry_after() -> None:
    slots = ReceiveSlots(total=1, per_caller=1)
    async with holding(slots, "a"):
        with pytest.raises(Overloaded) as refused:
            async with slots.slot("b", time.monotonic()):
                pass
    assert refused.value.reason == "receive" and refused.value.retry_after_s is not None
    assert "no receive slot for this request body" in str(refused.value)
    assert slots.held == 0 and not slots._waiting


async def test_a_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    slots = ReceiveSlots(total=1, per_caller=1)
    async with holding(slots, "a") as release:
        gone = asyncio.create_task(_take(slots, "b"))
        stays = asyncio.create_task(_take(slots, "c"))
        await asyncio.sleep(0)
        gone.cancel()
        release.set()
        await asyncio.wait_for(stays, LONG)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert slots.held == 0 and not slots._waiting
