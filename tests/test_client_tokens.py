"""The client's patch tokens: [N, rows, cols, dim] arrays equal to the server's, in every dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import EmbedClient, EmbedItemsError
from client.connection import RetryPolicy
from client.tokens import from_wire
from protos.dinov2.v1 import embed_pb2 as pb
from tests import images
from tests.conftest import RunningServer, assert_close
from tests.test_tokens import reference_tokens

FAST_RETRY = RetryPolicy(retry_for_s=5.0, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> EmbedClient:
    with EmbedClient(server.address, retry=FAST_RETRY) as embed_client:
        yield embed_client


def test_patch_tokens_are_the_reference_in_float32(client: EmbedClient, model_dir: Path) -> None:
    datas = [images.jpeg(300, 200, seed=k) for k in range(3)]
    tokens = client.patch_tokens(datas, dtype="float32")
    assert tokens.shape == (3, 16, 16, client.info().embedding_dim) and tokens.dtype == np.float32
    for k, data in enumerate(datas):
        assert_close(tokens[k], reference_tokens(model_dir, data, 224), f"image {k}")


def test_half_precision_tokens_keep_their_dtype_or_widen_bfloat16(client: EmbedClient) -> None:
    datas = [images.png(80, 60, seed=k) for k in range(2)]
    exact = client.patch_tokens(datas, dtype="float32")
    half = client.patch_tokens(datas, dtype="float16")
    brain = client.patch_tokens(datas, dtype="bfloat16", normalize=True)
    assert half.dtype == np.float16 and np.array_equal(half, exact.astype(np.float16))
    assert brain.dtype == np.float32 and brain.shape == exact.shape
    np.testing.assert_allclose(np.linalg.norm(brain, axis=-1), 1.0, atol=1e-2)


def test_a_failed_image_is_named_and_the_others_keep_their_tokens(client: EmbedClient) -> None:
    with pytest.raises(EmbedItemsError) as failed:
        client.patch_tokens([images.png(), b"not an image", images.png()], ids=["a", "bad", "c"])
    assert [f.id for f in failed.value.failures] == ["bad"]
    array = failed.value.embeddings
    assert array.shape[:3] == (3, 16, 16) and np.isnan(array[1]).all() and np.array_equal(array[0], array[2])


def test_tokens_arrive_beside_the_embedding_in_a_stream(client: EmbedClient) -> None:
    results = list(client.embed_iter([images.png(seed=k) for k in range(5)], patch_tokens="float16", batch_size=2))
    assert len(results) == 5
    assert all(r.ok and r.embedding is not None and r.patch_tokens is not None for r in results)
    assert all(r.patch_tokens.shape == (16, 16, r.embedding.shape[0]) for r in results)
    plain = list(client.embed_iter([images.png()]))
    assert len(plain) == 1 and plain[0].ok and plain[0].patch_tokens is None


def test_requests_are_cut_so_that_their_tokens_fit_one_message(make_server, runner) -> None:
    """A batch size whose answers could not fit the message limit is lowered by the client, not refused."""
    small = make_server(max_request_bytes=4 * 16 * 16 * runner.embedding_dim * 4)
    with EmbedClient(small.address, retry=FAST_RETRY, max_message_bytes=4 * 16 * 16 * runner.embedding_dim * 4
                     ) as limited:  # fmt: skip
        tokens = limited.patch_tokens([images.png(seed=k) for k in range(7)], dtype="float32", batch_size=32)
    assert tokens.shape[0] == 7 and not np.isnan(tokens).any()


def test_an_unknown_dtype_is_refused_before_anything_is_sent(client: EmbedClient) -> None:
    with pytest.raises(ValueError, match="must be one of float32, float16, bfloat16"):
        client.patch_tokens([images.png()], dtype="int8")


def test_tokens_whose_bytes_do_not_match_their_shape_are_refused() -> None:
    wrong = pb.PatchTokens(rows=2, cols=2, dim=3, dtype=pb.TOKEN_DTYPE_FLOAT16, data=b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot be 10 bytes"):
        from_wire(wrong)
