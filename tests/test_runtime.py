"""The process-level runtime: the compute thread, the OS names of the server's threads, frozen start objects."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import pytest

from server.runtime import ComputeThread, freeze_startup_objects, name_os_thread

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
