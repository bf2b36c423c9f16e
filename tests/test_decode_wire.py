"""The decode workers' frames: what is sent is what is read, and nothing else is read."""

from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest

from server.decode import wire
from server.errors import Internal, InvalidImage

SIZE = 8


def pixels(value: int) -> np.ndarray:
    return np.full((SIZE, SIZE), value, dtype=np.uint8)


def test_results_and_failures_come_back_as_sent() -> None:
    sent = [pixels(1), InvalidImage("corrupt PNG"), pixels(2), Internal("internal error"), pixels(3)]
    body = bytearray(b"".join(wire.encode_results(sent, ["Traceback: boom"])))
    results, failures = wire.decode_results(body, len(sent), SIZE)
    assert failures == ["Traceback: boom"]
    for got, want in zip(results, sent, strict=True):
        if isinstance(want, np.ndarray):
            assert isinstance(got, np.ndarray) and got.shape == (SIZE, SIZE) and np.array_equal(got, want)
        else:
            assert type(got) is type(want) and str(got) == str(want)


def test_a_chunk_of_errors_only() -> None:
    results, _ = wire.decode_results(bytearray(b"".join(wire.encode_results([InvalidImage("x")], []))), 1, SIZE)
    assert isinstance(results[0], InvalidImage)


def test_full_size_images_come_back_in_their_own_shapes() -> None:
    sent = [np.arange(12, dtype=np.uint8).reshape(3, 4), InvalidImage("bad"), np.full((5, 1), 9, dtype=np.uint8)]
    results, _ = wire.decode_results(bytearray(b"".join(wire.encode_results(sent, []))), 3, None)
    assert np.array_equal(results[0], sent[0]) and np.array_equal(results[2], sent[2])
    assert isinstance(results[1], InvalidImage)
    with pytest.raises(wire.WireError, match="3x4"):  # the workers were to resize: refused
        wire.decode_results(bytearray(b"".join(wire.encode_results(sent, []))), 3, SIZE)


def corrupt(body: bytes, at: int, value: bytes) -> bytearray:
    changed = bytearray(body)
    changed[at : at + len(value)] = value
    return changed


GOOD = b"".join(wire.encode_results([pixels(1), InvalidImage("bad")], []))


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (bytearray(GOOD), 3),  # answers another chunk
        (bytearray(GOOD[:-1]), 2),  # a pixel short
        (bytearray(GOOD + b"\0"), 2),  # a byte too many
        (corrupt(GOOD, 4, b"\x07"), 2),  # an unknown item tag in place of the image's
        (corrupt(GOOD, 15, b"Pickle"), 2),  # an error type that is not the engine's
        (corrupt(GOOD, 5, struct.pack("<II", 4, 16)), 2),  # 64 pixels, but not image_size x image_size
        (bytearray(GOOD[:10]), 2),  # cut short
    ],
    ids=["count", "short", "long", "tag", "type", "shape", "truncated"],
)
def test_a_malformed_answer_is_refused(body: bytearray, count: int) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_results(body, count, SIZE)


ERROR_TAG_AT = 4 + 1 + 8  # GOOD: the count, then the image's tag and shape; then the error's tag


@pytest.mark.parametrize("tag", [b"\x02", b"\xff"], ids=["2", "255"])
def test_an_unknown_tag_before_a_valid_error_record_is_refused(tag: bytes) -> None:
    assert GOOD[ERROR_TAG_AT] == 1  # the error's record is intact: only its tag is wrong
    with pytest.raises(wire.WireError, match=f"an item tagged {tag[0]}"):
        wire.decode_results(corrupt(GOOD, ERROR_TAG_AT, tag), 2, SIZE)


def frames(*raw: bytes) -> int:
    """A pipe holding `raw`, closed for writing: its read end."""
    read, write = os.pipe()
    for data in raw:
        os.write(write, data)
    os.close(write)
    return read


def test_frames_are_read_whole_and_bounded() -> None:
    read = frames(struct.pack("<cQ", wire.HOLD, 8) + wire.encode_count(12345))
    kind, body = wire.read_frame(read, max_body=8)
    assert kind == wire.HOLD and wire.decode_count(body) == 12345
    with pytest.raises(wire.WireError, match="closed"):
        wire.read_frame(read, max_body=8)
    os.close(read)


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("<cQ", wire.DONE, 100) + b"x" * 100,  # over the bound: refused before it is read
        struct.pack("<cQ", b"\x80", 4) + b"\x04N.",  # a pickle is no frame
        struct.pack("<cQ", wire.DONE, 50) + b"x" * 10,  # cut short
    ],
    ids=["over-bound", "pickle", "cut-short"],
)
def test_a_frame_out_of_format_is_refused(raw: bytes) -> None:
    read = frames(raw)
    with pytest.raises(wire.WireError):
        wire.read_frame(read, max_body=99)
    os.close(read)


def test_a_chunk_comes_through_a_pipe_as_sent_in_frames_larger_than_the_pipe() -> None:
    chunk = [b"", os.urandom(300_000), b"x", os.urandom(70_000)]  # 370 kB through a 64 kB pipe: partial writes
    read, write = os.pipe()
    received: list[tuple[bytes, bytearray]] = []
    reader = threading.Thread(target=lambda: received.extend(
        wire.read_frame(read, 1 << 20, wire.FROM_PARENT) for _ in range(3)))  # fmt: skip
    reader.start()
    wire.write_frame(write, wire.CHUNK, *wire.encode_chunk(chunk))
    wire.write_frame(write, wire.GRANT)
    wire.write_frame(write, wire.STOP)
    reader.join()
    os.close(read)
    os.close(write)
    (kind, body), grant, stop = received
    assert kind == wire.CHUNK and wire.decode_chunk(body) == chunk
    assert grant == (wire.GRANT, bytearray()) and stop == (wire.STOP, bytearray())


def test_each_side_reads_only_the_other_sides_frames() -> None:
    read = frames(struct.pack("<cQ", wire.CHUNK, 0))
    with pytest.raises(wire.WireError):
        wire.read_frame(read, max_body=99)  # the parent reads what children send
    os.close(read)
    read = frames(struct.pack("<cQ", wire.DONE, 0))
    with pytest.raises(wire.WireError):
        wire.read_frame(read, max_body=99, kinds=wire.FROM_PARENT)
    os.close(read)


def test_a_chunk_whose_lengths_do_not_add_up_is_refused() -> None:
    body = bytearray(b"".join(wire.encode_chunk([b"abc", b"de"])))
    with pytest.raises(wire.WireError):
        wire.decode_chunk(body + b"!")
    with pytest.raises(wire.WireError):
        wire.decode_chunk(bytearray(b"\x05\x00\x00\x00"))  # 5 images and no lengths


def test_a_results_frame_written_in_parts_reads_back_as_one_body() -> None:
    sent = [pixels(7), InvalidImage("bad"), pixels(9)]  # 2-D pixel buffers: sized in bytes, not rows
    read, write = os.pipe()
    wire.write_frame(write, wire.DONE, *wire.encode_results(sent, []))
    os.close(write)
    kind, body = wire.read_frame(read, wire.max_results_body(len(sent), SIZE * SIZE))
    os.close(read)
    results, _ = wire.decode_results(body, len(sent), SIZE)
    assert kind == wire.DONE and np.array_equal(results[0], sent[0]) and np.array_equal(results[2], sent[2])
