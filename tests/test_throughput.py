"""The engine's clock: forward-pass times by batch size and decode times make a backlog's estimate."""

from __future__ import annotations

import pytest

from server.throughput import DecodeTimes, ForwardTimes, Throughput


def test_nothing_is_estimated_before_a_forward_pass_was_measured() -> None:
    times = ForwardTimes()
    assert times.batch_seconds(8) is None and times.seconds_for(20, 8) is None
    assert Throughput(times, DecodeTimes(2)).estimate(20, 0, 20, 1, 8) is None


def test_a_size_seen_is_a_moving_average_of_its_passes() -> None:
    times = ForwardTimes()
    times.observe(8, 1.0)
    assert times.batch_seconds(8) == 1.0
    times.observe(8, 2.0)
    assert 1.0 < times.batch_seconds(8) < 2.0  # type: ignore[operator]


def test_an_unseen_size_scales_from_the_largest_smaller_one_else_takes_the_next_larger_one() -> None:
    times = ForwardTimes()
    times.observe(2, 0.2)
    times.observe(8, 0.4)
    assert times.batch_seconds(16) == pytest.approx(0.8)  # 8's time per image, twice the images
    assert times.batch_seconds(4) == pytest.approx(0.4)  # 2's time per image: errs long, not short
    lone = ForwardTimes()
    lone.observe(16, 0.5)
    assert lone.batch_seconds(4) == 0.5  # no smaller size seen: as long as a larger batch


def test_a_backlog_runs_in_full_batches_and_one_partial_batch() -> None:
    times = ForwardTimes()
    times.observe(8, 1.0)
    times.observe(4, 0.6)
    assert times.seconds_for(20, 8) == pytest.approx(2 * 1.0 + 0.6)
    assert times.seconds_for(16, 8) == pytest.approx(2.0)


def test_the_estimate_is_the_slower_of_forward_passes_and_decoding() -> None:
    forward, decode = ForwardTimes(), DecodeTimes(workers=2)
    forward.observe(8, 0.1)
    throughput = Throughput(forward, decode)
    assert throughput.estimate(16, 0, 16, 1, 8).seconds == pytest.approx(0.2)  # type: ignore[union-attr]
    decode.observe(images=4, seconds=2.0)  # 0.5 s an image on one worker, two workers
    backlog = throughput.estimate(16, 0, 16, 1, 8)
    assert backlog is not None and backlog.seconds == pytest.approx(16 * 0.5 / 2)
    assert backlog.rate == pytest.approx(16 / backlog.seconds)


def test_a_new_caller_waits_for_its_share_of_the_decoders_not_for_everything_queued_there() -> None:
    forward, decode = ForwardTimes(), DecodeTimes(workers=2)
    forward.observe(8, 0.001)
    decode.observe(images=1, seconds=0.5)
    throughput = Throughput(forward, decode)
    # 64 images of one other caller still to decode: a request of one waits for one of theirs, not 64
    small = throughput.estimate(64, 1, 64, 1, 8)
    assert small is not None and small.seconds == pytest.approx((1 + 1) * 0.5 / 2)
    assert small.own_seconds == pytest.approx(0.5 / 2) and small.wait == pytest.approx(0.25)
    # but never longer than everything queued would take
    assert throughput.estimate(2, 10, 2, 1, 8).seconds == pytest.approx((2 + 10) * 0.5 / 2)  # type: ignore[union-attr]


def test_images_ahead_still_queued_for_decoding_are_not_all_counted_before_a_new_callers_forward_pass() -> None:
    forward, decode = ForwardTimes(), DecodeTimes(workers=2)
    forward.observe(8, 1.0)  # a slow model
    decode.observe(images=1, seconds=0.5)
    throughput = Throughput(forward, decode)
    # 64 of another caller's images ahead: 4 decoded, 2 being decoded, 58 queued; its one share goes first
    small = throughput.estimate(64, 1, 60, 1, 8, taken=2)
    assert small is not None and small.seconds == pytest.approx(1.0)  # 4 + 2 + 1 + 1 images: one batch, not 9
    assert throughput.estimate(64, 1, 60, 1, 8).seconds == pytest.approx(9.0)  # type: ignore[union-attr]
    assert throughput.estimate(64, 0, 60, 1, 8, taken=2).seconds == pytest.approx(60 * 0.5 / 2)  # type: ignore[union-attr]
