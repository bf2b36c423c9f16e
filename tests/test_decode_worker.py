"""Decoding in child processes: the same pixels and errors as in-process, the parent's pixel
budget held across the process boundary, and a worker that dies loses no image."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from server import decode_wire as wire
from server.decode_worker import SMALL_PIXELS, ProcessDecoder, Setup
from server.errors import InvalidImage
from server.preprocess import ImageLimits, PixelBudget, decode
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
    first_child = worker._process.pid

    killer = kill_once_budget_is_held(first_child, budget)
    results = worker.decode(chunk)
    killer.join()
    assert worker._process.pid != first_child
    for data, result in zip(chunk, results, strict=True):
        np.testing.assert_array_equal(result, decode(data, LIMITS, 224))
    assert worker.decode([images.png()])[0].shape == (224, 224)


def test_a_worker_killed_with_two_chunks_in_flight_answers_both(worker: ProcessDecoder, budget: PixelBudget) -> None:
    first = [images.png(32, 32, seed=1), big_png(), images.png(seed=2)]
    second = [images.jpeg(100, 80, seed=3), b"not an image", images.png(seed=4)]
    child = worker._process.pid

    killer = kill_once_budget_is_held(child, budget)
    worker.send(first)
    worker.send(second)
    results = worker.receive() + worker.receive()
    killer.join()
    assert worker._process.pid != child and budget.held == 0
    for data, result in zip(first + second, results, strict=True):
        if data == b"not an image":
            assert isinstance(result, InvalidImage)
        else:
            np.testing.assert_array_equal(result, decode(data, LIMITS, 224))


def test_a_malformed_answer_restarts_the_worker_and_no_image_is_lost(
    worker: ProcessDecoder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    chunk = [images.png(32, 32, seed=i) for i in range(3)]
    child = worker._process.pid
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
    assert worker._process.pid != child
    assert "malformed answer" in caplog.text
    for data, result in zip(chunk, results, strict=True):
        np.testing.assert_array_equal(result, decode(data, LIMITS, 224))


def test_a_chunk_the_child_cannot_read_ends_it_and_the_next_chunk_is_decoded_by_a_new_one(
    worker: ProcessDecoder,
) -> None:
    child = worker._process
    wire.write_frame(worker._to_child, wire.CHUNK, b"\x05\x00\x00\x00")  # 5 images, no lengths
    assert child.wait(timeout=10) == 0  # it stops rather than waiting forever on a broken reader
    chunk = [images.png(16, 16, seed=1), images.png(20, 20, seed=2)]
    for data, result in zip(chunk, worker.decode(chunk), strict=True):
        np.testing.assert_array_equal(result, decode(data, LIMITS, 224))
    assert worker._process is not child


def test_closing_ends_the_child(budget: PixelBudget) -> None:
    decoder = ProcessDecoder(Setup(LIMITS, 224, idle_trim_s=0.2), budget)
    decoder.decode([images.png()])
    decoder.close()
    assert decoder._process.poll() is not None
