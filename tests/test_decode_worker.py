"""Decoding in child processes: the same pixels and errors as in-process, the parent's pixel
budget held across the process boundary, and a worker that dies loses no image."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

from server.decode import wire
from server.decode.budget import PixelBudget
from server.decode.setup import SMALL_PIXELS, Setup
from server.decode.worker import ProcessDecoder, backoff_s
from server.errors import Internal, InvalidImage
from server.preprocess import ImageLimits, decode
from tests import images

LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=50_000_000)


def big_png(width: int = 3000, height: int = 2000) -> bytes:
    """A picture over SMALL_PIXELS that takes a while to decode."""
    return images.encode(Image.fromarray(images.pattern(width, height, seed=3)), "PNG", compress_level=1)


def kill_once_budget_is_held(pid: int, budget: PixelBudget) -> threading.Thread:
    """Kills the child while it decodes a large image (it holds part of the budget then)."""

    def kill() -> None:
        while budget.held == 0:
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


@pytest.fixture
def budget() -> PixelBudget:
    return PixelBudget(100_000_000)


@pytest.fixture
def worker(budget: PixelBudget):
    decoder = ProcessDecoder(Setup(LIMITS, 224, idle_trim_s=0.2), budget)
    yield decoder
    decoder.close()


def test_the_same_pixels_and_errors_as_decoding_in_process(worker: ProcessDecoder) -> None:
    chunk = [images.png(40, 30, seed=1), b"not an image", images.jpeg(300, 200, seed=2), b"", images.png(seed=5)]
    results = worker.decode(chunk)
    assert len(results) == len(chunk)
    for data, result in zip(chunk, results, strict=True):
        try:
            expected = decode(data, LIMITS, 224)
        except InvalidImage as exc:
            assert isinstance(result, InvalidImage) and str(result) == str(exc)
            assert result.__traceback__ is None
        else:
            assert isinstance(result, np.ndarray) and result.dtype == np.uint8
            np.testing.assert_array_equal(result, expected)


def test_a_large_image_holds_the_parents_budget_while_it_decodes(worker: ProcessDecoder, budget: PixelBudget) -> None:
    data = big_png()
    assert SMALL_PIXELS < 3000 * 2000
    held: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            held.append(budget.held)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        (result,) = worker.decode([data])
    finally:
        done.set()
        watcher.join()
    np.testing.assert_array_equal(result, decode(data, LIMITS, 224))
    assert max(held) == 3000 * 2000
    assert budget.held == 0


def test_a_budget_smaller_than_an_image_lets_it_decode_alone() -> None:
    budget = PixelBudget(SMALL_PIXELS + 1)
    decoder = ProcessDecoder(Setup(LIMITS, 224, idle_trim_s=0.2), budget)
    try:
        (result,) = decoder.decode([big_png()])
    finally:
        decoder.close()
    assert isinstance(result, np.ndarray)
    assert budget.held == 0


def test_a_worker_killed_mid_chunk_is_replaced_and_no_image_is_lost(
    worker: ProcessDecoder, budget: PixelBudget
) -> None:
    chunk = [images.png(32, 32, seed=i) for i in range(3)] + [big_png()] + [images.png(seed=9)]
    first_child = worker.pid

    killer = kill_once_budget_is_held(first_child, budget)
    results = worker.decode(chunk)
    killer.join()
    assert worker.pid != first_child
    for data, result in zip(chunk, results, strict=True):
        np.testing.assert_array_equal(result, decode(data, LIMITS, 224))
    assert worker.decode([images.png()])[0].shape == (224, 224)


def test_a_worker_killed_with_two_chunks_in_flight_answers_both(worker: ProcessDecoder, budget: PixelBudget) -> None:
    first = [images.png(32, 32, seed=1), big_png(), images.png(seed=2)]
    second = [images.jpeg(100, 80, seed=3), b"not an image", images.png(seed=4)]
    child = worker.pid

    killer = kill_once_budget_is_held(child, budget)
    worker.send(first)
    worker.send(second)
    results = worker.receive() + worker.receive()
    killer.join()
    assert worker.pid != child and budget.held == 0
    for data, result in zip(first + second, results, strict=True):
        if data == b"not an image":
            assert isinstance(result, InvalidImage)
        else:
            np.testing.assert_array_equal(result, decode(data, LIMITS, 224))


def test_a_malformed_answer_restarts_the_worker_and_no_image_is_lost(
    worker: ProcessDecoder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    chunk = [images.png(32, 32, seed=i) for i in range(3)]
    child = worker.pid
    real = wire.decode_results
    answers = 0

    def first_one_malformed(body: bytearray, count: int, image_size: int):  # type: ignore[no-untyped-def]
        nonlocal answers
        answers += 1
        if answers == 1:
            raise wire.WireError("malformed results: a test")
        return real(body, count, image_size)

    monkeypatch.setattr(wire, "decode_results", first_one_malformed)
    results = worker.decode(chunk)
    assert worker.pid != child
    assert "malformed answer" in caplog.text
    for data, result in zip(chunk, results, strict=True):
        np.testing.assert_array_equal(result, decode(data, LIMITS, 224))


def test_a_chunk_the_child_cannot_read_ends_it_and_the_next_chunk_is_decoded_by_a_new_one(
    worker: ProcessDecoder,
) -> None:
    child = worker._child
    assert child is not None
    wire.write_frame(child.to_child, wire.CHUNK, b"\x05\x00\x00\x00", deadline=time.monotonic() + 10)  # no lengths
    assert child.process.wait(timeout=10) == 0  # it stops rather than waiting forever on a broken reader
    chunk = [images.png(16, 16, seed=1), images.png(20, 20, seed=2)]
    for data, result in zip(chunk, worker.decode(chunk), strict=True):
        np.testing.assert_array_equal(result, decode(data, LIMITS, 224))
    assert worker._child is not child


def test_closing_ends_the_child(budget: PixelBudget) -> None:
    decoder = ProcessDecoder(Setup(LIMITS, 224, idle_trim_s=0.2), budget)
    decoder.decode([images.png()])
    assert decoder._child is not None
    process = decoder._child.process
    decoder.close()
    assert process.poll() is not None


def solid_png(value: int) -> bytes:
    return images.encode(Image.new("L", (8, 8), value), "PNG")


def test_a_restart_that_fails_fails_the_chunks_in_flight_and_the_next_chunk_gets_its_own_pixels(
    worker: ProcessDecoder, budget: PixelBudget, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts = 0

    def no_process(*args: object, **kwargs: object) -> None:
        nonlocal starts
        starts += 1
        raise OSError(errno.EMFILE, "Too many open files")

    killer = kill_once_budget_is_held(worker.pid, budget)  # type: ignore[arg-type]
    monkeypatch.setattr(subprocess, "Popen", no_process)
    worker.send([solid_png(10), big_png()])
    worker.send([solid_png(20)])
    answers = worker.receive() + worker.receive()
    killer.join()
    assert [str(a) for a in answers] == ["no decode worker process could be started; retry"] * 3
    assert all(isinstance(a, Internal) for a in answers)
    assert starts == 2  # one try per chunk, not per image
    assert worker.pid is None and budget.held == 0
    monkeypatch.undo()
    results = worker.decode([solid_png(200), solid_png(200)])
    assert len(results) == 2
    for result in results:
        assert isinstance(result, np.ndarray) and (result == 200).all()


def test_an_image_that_takes_longer_than_the_timeout_is_stopped_with_its_child(budget: PixelBudget) -> None:
    flat = images.encode(Image.new("L", (8000, 6250), 128), "WEBP", lossless=True)  # 50 MP: over a second
    decoder = ProcessDecoder(Setup(LIMITS, 224, idle_trim_s=0.2, timeout_s=0.05), budget)
    try:
        child = decoder._child
        assert child is not None
        (result,) = decoder.decode([flat])
        assert isinstance(result, InvalidImage)
        assert str(result) == "decoding this image took longer than 0.05 s; it was stopped"
        assert child.process.returncode == -signal.SIGKILL
        assert budget.held == 0
    finally:
        decoder.close()


def test_crashes_in_a_row_wait_longer_before_the_next_start() -> None:
    assert [backoff_s(n) for n in range(1, 9)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
