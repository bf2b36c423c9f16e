"""The client library against real in-process servers: results, order, errors, spreading, retries, security."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from client import (
    AsyncEmbedClient,
    EmbedClient,
    EmbedItemsError,
    EmbedRequestError,
    ItemResult,
    RetryPolicy,
)
from client.images import png_bytes
from server.model import Pooling
from tests import images
from tests.conftest import ControlledRunner, Reference, RunningServer, assert_close

FAST_RETRY = RetryPolicy(max_attempts=12, initial_backoff_s=0.05, max_backoff_s=0.5)
INVALID_ARGUMENT, NOT_FOUND = 3, 5


def pictures(count: int, start: int = 0) -> list[bytes]:
    """Small distinct PNGs, so a result in the wrong place shows."""
    return [images.png(40, 30, seed=seed) for seed in range(start, start + count)]


def ok_images(running: RunningServer) -> float:
    return running.metrics.value("dinov2_images_total", {"outcome": "ok"})


def stream_requests(running: RunningServer, code: str) -> float:
    return running.metrics.value("dinov2_requests_total", {"method": "EmbedStream", "code": code})


@pytest.fixture
def client(server: RunningServer) -> Iterator[EmbedClient]:
    with EmbedClient(server.address, retry=FAST_RETRY) as embed_client:
        yield embed_client


def test_embed_takes_bytes_paths_pil_and_arrays_and_equals_the_reference(
    client: EmbedClient, reference: Reference, tmp_path: Path
) -> None:
    data = images.png(64, 48, seed=3)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    pil = Image.open(path)
    pil.load()
    array = np.asarray(pil)
    vectors = client.embed([data, str(path), path, pil, array])
    assert vectors.dtype == np.float32 and vectors.shape == (5, 32)
    expected = reference.embed(data)
    for row in vectors:
        assert_close(row, expected, "input kinds")


def test_pooling_and_normalize_reach_the_server(client: EmbedClient, reference: Reference) -> None:
    data = pictures(1)[0]
    vectors = client.embed([data], pooling="cls_mean", normalize=True)
    assert_close(vectors[0], reference.embed(data, Pooling.CLS_MEAN, True), "cls_mean normalized")
    assert_close(client.embed([data], pooling="mean")[0], reference.embed(data, Pooling.MEAN), "mean")
    with pytest.raises(ValueError, match="pooling must be one of"):
        client.embed([data], pooling="max")


def test_arrays_are_sent_losslessly(client: EmbedClient, reference: Reference) -> None:
    gray = images.pattern(50, 40, seed=4)[..., 0]
    rgba = np.dstack([images.pattern(50, 40, seed=5), np.full((40, 50), 200, np.uint8)])
    vectors = client.embed([gray, rgba])
    assert_close(vectors[0], reference.embed(png_bytes(Image.fromarray(gray))), "gray array")
    assert_close(vectors[1], reference.embed(png_bytes(Image.fromarray(rgba))), "rgba array")
    with pytest.raises(TypeError, match="uint8"):
        client.embed([np.zeros((4, 4), np.float64)])


def test_stream_keeps_input_order_and_reads_the_input_lazily(client: EmbedClient, reference: Reference) -> None:
    datas = pictures(200)
    pulled = 0

    def source() -> Iterator[tuple[str, bytes]]:
        nonlocal pulled
        for index, data in enumerate(datas):
            pulled += 1
            yield f"img-{index}", data

    results: list[ItemResult] = []
    for result in client.embed_iter(source(), batch_size=7, window=4):
        if not results:
            pulled_at_first = pulled
        results.append(result)
    assert pulled_at_first <= 7 * 5  # the window plus the request being read, not the whole input
    assert [r.index for r in results] == list(range(200))
    assert [r.id for r in results] == [f"img-{i}" for i in range(200)]
    for result, data in zip(results, datas, strict=True):
        assert result.ok
        assert_close(result.embedding, reference.embed(data), result.id)  # type: ignore[arg-type]


def test_a_failing_image_is_named_and_the_others_are_kept(client: EmbedClient, reference: Reference) -> None:
    datas = pictures(4)
    inputs = [datas[0], datas[1], b"not an image", datas[2], datas[3]]
    with pytest.raises(EmbedItemsError) as info:
        client.embed(inputs, ids=["a", "b", "broken", "c", "d"])
    error = info.value
    assert [(f.index, f.id, f.error.code) for f in error.failures] == [(2, "broken", INVALID_ARGUMENT)]  # type: ignore[union-attr]
    assert "#2 'broken'" in str(error) and "not a decodable image" in str(error)
    assert error.ok.tolist() == [True, True, False, True, True]
    assert np.isnan(error.embeddings[2]).all()
    for row, data in zip(error.embeddings[error.ok], datas, strict=True):
        assert_close(row, reference.embed(data), "partial result")

    streamed = list(client.embed_iter(inputs, batch_size=2))
    assert [r.ok for r in streamed] == [True, True, False, True, True]
    assert streamed[2].embedding is None and streamed[2].error.code_name == "INVALID_ARGUMENT"  # type: ignore[union-attr]


def test_an_unreadable_path_fails_alone_without_reaching_the_server(
    client: EmbedClient, server: RunningServer, tmp_path: Path
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(pictures(1)[0])
    results = list(client.embed_iter([good, tmp_path / "missing.png"]))
    assert results[0].ok
    assert results[1].error.code == NOT_FOUND and "missing.png" in results[1].error.message  # type: ignore[union-attr]
    before = server.metrics.value("dinov2_images_total", {"outcome": "InvalidImage"})
    assert next(iter(client.embed_iter([tmp_path / "missing.png"]))).error is not None
    assert server.metrics.value("dinov2_images_total", {"outcome": "InvalidImage"}) == before


def test_info_describes_the_server(client: EmbedClient, server: RunningServer) -> None:
    info = client.info()
    assert info.embedding_dim == 32 and info.image_size == 224
    assert info.max_request_bytes == server.server.settings.max_request_bytes


def test_breaking_out_of_a_stream_leaves_the_client_usable(client: EmbedClient) -> None:
    for result in client.embed_iter(pictures(40), batch_size=2, window=4):
        assert result.ok
        break
    assert client.embed(pictures(2)).shape == (2, 32)


def test_empty_input_gives_an_empty_array_of_the_embedding_size(client: EmbedClient) -> None:
    empty = client.embed([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    assert client.embed([], pooling="cls_mean").shape == (0, 64)


def test_an_image_whose_batch_failed_is_sent_again(make_server: Any, runner: Any, reference: Reference) -> None:
    controlled = ControlledRunner(runner)
    flaky = make_server(runner_=controlled, probe_interval_s=0.1)
    controlled.fail_batches = 1  # the first forward pass fails: its images come back INTERNAL
    datas = pictures(3)
    with EmbedClient(flaky.address, retry=FAST_RETRY) as client:
        vectors = client.embed(datas, batch_size=3)
    assert flaky.metrics.value("dinov2_inference_failures_total") == 1
    assert ok_images(flaky) == 3
    for i, data in enumerate(datas):
        assert_close(vectors[i], reference.embed(data), f"retried {i}")


def test_an_image_whose_batch_keeps_failing_is_sent_item_retries_more_times(make_server: Any, runner: Any) -> None:
    controlled = ControlledRunner(runner)
    broken = make_server(runner_=controlled, probe_interval_s=60, max_wait_ms=0)
    controlled.failing = True
    retry = dataclasses.replace(FAST_RETRY, item_retries=2)
    with EmbedClient(broken.address, retry=retry) as client:
        (result,) = list(client.embed_iter(pictures(1)))
    assert result.error is not None and result.error.code_name == "INTERNAL"
    assert broken.metrics.value("dinov2_inference_failures_total") == 3  # the first try and 2 retries


def test_an_invalid_image_is_not_sent_again(client: EmbedClient, server: RunningServer) -> None:
    before = stream_requests(server, "OK")
    results = list(client.embed_iter([b"not an image"]))
    assert results[0].error is not None and results[0].error.code == INVALID_ARGUMENT
    client.close()  # the stream ends, and with it its count
    assert stream_requests(server, "OK") - before == 1


async def test_async_client_equals_the_sync_client(server: RunningServer, client: EmbedClient) -> None:
    datas = pictures(30)
    expected = client.embed(datas)
    async with AsyncEmbedClient(server.address) as async_client:
        assert_close(await async_client.embed(datas, batch_size=4, window=3), expected, "async embed")

        async def source() -> Any:
            for data in datas:
                yield data

        results = [r async for r in async_client.embed_iter(source(), batch_size=4)]
        assert [r.index for r in results] == list(range(30))
        assert_close(np.stack([r.embedding for r in results]), expected, "async stream")  # type: ignore[misc]
        assert (await async_client.info()).embedding_dim == 32


def test_one_streaming_job_spreads_over_two_servers(make_server: Any, reference: Reference) -> None:
    first, second = make_server(), make_server()
    with EmbedClient([first.address, second.address]) as two:
        results = list(two.embed_iter(pictures(200), batch_size=5, window=4))
    assert all(r.ok for r in results) and [r.index for r in results] == list(range(200))
    for result, data in zip(results, pictures(200), strict=True):
        assert_close(result.embedding, reference.embed(data), f"image {result.index}")  # type: ignore[arg-type]
    assert ok_images(first) > 0 and ok_images(second) > 0
    assert ok_images(first) + ok_images(second) == 200


def test_a_draining_server_is_retried_elsewhere(make_server: Any, reference: Reference) -> None:
    draining, healthy = make_server(), make_server()

    async def drain() -> None:
        draining.server.service.begin_drain()

    draining.call(drain)
    datas = pictures(40)
    with EmbedClient([draining.address, healthy.address], retry=FAST_RETRY) as two:
        vectors = two.embed(datas, batch_size=4, window=4)
    assert stream_requests(draining, "UNAVAILABLE") > 0
    assert ok_images(healthy) == 40
    assert_close(vectors[-1], reference.embed(datas[-1]), "retried")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_server_that_starts_late_is_waited_for(make_server: Any) -> None:
    port = _free_port()
    starter = threading.Timer(0.7, lambda: make_server(port=port))
    starter.start()
    try:
        with EmbedClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout=30) as late:
            started = time.monotonic()
            assert late.embed(pictures(3)).shape == (3, 32)
            assert time.monotonic() - started >= 0.5
    finally:
        starter.join()


def test_no_server_fails_with_unavailable_after_the_retries() -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    with EmbedClient(f"127.0.0.1:{_free_port()}", retry=retry) as nowhere:
        with pytest.raises(EmbedRequestError) as info:
            nowhere.embed(pictures(2))
        assert info.value.code_name == "UNAVAILABLE" and info.value.attempts == 3
        with pytest.raises(EmbedRequestError):
            nowhere.info()


def test_a_full_queue_is_retried_with_backoff(make_server: Any) -> None:
    small = make_server(max_queue_images=8)
    with EmbedClient(small.address, retry=FAST_RETRY) as client:
        results = list(client.embed_iter(pictures(60), batch_size=7, window=4))
    assert all(r.ok for r in results)
    assert stream_requests(small, "RESOURCE_EXHAUSTED") > 0
    assert ok_images(small) == 60


def test_a_refused_request_is_not_retried(make_server: Any) -> None:
    strict = make_server(max_images_per_request=4)
    with EmbedClient(strict.address, retry=FAST_RETRY) as client, pytest.raises(EmbedRequestError) as info:
        client.embed(pictures(10), batch_size=8)
    assert info.value.code_name == "INVALID_ARGUMENT" and info.value.attempts == 1
    assert "over the limit" in info.value.message and len(info.value.ids) == 8


def test_timeout_bounds_each_try_at_the_server(make_server: Any, runner: Any) -> None:
    """The timeout travels with the request: the server answers at it, while the forward pass still runs."""
    controlled = ControlledRunner(runner)
    slow = make_server(runner_=controlled)
    seen = controlled.images_seen  # the start's warm-up passes
    controlled.allow(0)  # every forward pass from now on waits in the model
    try:
        with EmbedClient(slow.address, timeout=0.3, retry=RetryPolicy(max_attempts=1)) as client:
            with pytest.raises(EmbedRequestError) as info:
                client.embed(pictures(1))
            held = controlled.images_seen == seen
    finally:
        controlled.allow(float("inf"))
    assert info.value.code_name == "DEADLINE_EXCEEDED" and held
    assert "deadline passed" in info.value.message


def test_requests_stay_under_the_message_limit(client: EmbedClient, server: RunningServer) -> None:
    datas = [images.png(300, 300, seed=s) for s in range(6)]  # ~270 kB each
    limit = 64 * 1024 + 2 * len(datas[0]) + 1000
    with EmbedClient(server.address, max_message_bytes=limit) as small:
        assert small.embed(datas).shape == (6, 32)
        big = images.png(700, 700, seed=1)
        results = list(small.embed_iter([datas[0], big]))
    assert results[0].ok and results[1].error.code == INVALID_ARGUMENT  # type: ignore[union-attr]
    assert "message budget" in results[1].error.message  # type: ignore[union-attr]


# ------------------------------------------------------------ API key and TLS


def test_api_key_is_sent_as_bearer_metadata(make_server: Any) -> None:
    guarded = make_server(api_key="s3cret")
    with EmbedClient(guarded.address, api_key="s3cret") as keyed:
        assert keyed.embed(pictures(2)).shape == (2, 32)
        assert keyed.info().embedding_dim == 32
    with EmbedClient(guarded.address) as anonymous, pytest.raises(EmbedRequestError) as info:
        anonymous.embed(pictures(1))
    assert info.value.code_name == "UNAUTHENTICATED" and info.value.attempts == 1


def test_tls_with_a_root_certificate_file(make_server: Any, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    secure = make_server(tls_cert=str(cert), tls_key=str(key))
    with EmbedClient(secure.address, tls_ca=cert) as tls_client:
        assert tls_client.embed(pictures(2)).shape == (2, 32)
    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
    with EmbedClient(secure.address, retry=retry, timeout=5) as plain, pytest.raises(EmbedRequestError):
        plain.embed(pictures(1))


def test_results_are_never_silent_zeros(client: EmbedClient) -> None:
    with pytest.raises(EmbedItemsError) as info:
        client.embed([b""])
    assert info.value.embeddings.shape == (1, 0)
    assert isinstance(info.value.results[0], ItemResult) and not info.value.results[0].ok
    assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == info.value.failures[0].error.code  # type: ignore[union-attr]
