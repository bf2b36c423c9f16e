"""Patch tokens: parity with the reference's last hidden state, the number types, and the size bounds."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from protos.dinov2.v1 import embed_pb2 as pb
from server.model import BatchOutput, ModelRunner
from server.preprocess import ImageLimits, configured_processor, decode, normalization_of
from server.random_model import build_model_dir
from server.tokens import PatchTokens, TokenOptions, as_float32
from tests import images
from tests.conftest import RunningServer, assert_close

LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=50_000_000)


@torch.inference_mode()
def reference_tokens(model_dir: Path, data: bytes, image_size: int) -> np.ndarray:
    """The reference's patch tokens, [rows, cols, D]: `last_hidden_state[:, 1 + registers:]`."""
    processor = configured_processor(str(model_dir), None, image_size=image_size)
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pixel_values = processor(Image.open(io.BytesIO(data)).convert("L"), return_tensors="pt")["pixel_values"]
    hidden = model(pixel_values=pixel_values).last_hidden_state[0]
    first = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    side = image_size // model.config.patch_size
    return hidden[first:].numpy().reshape(side, side, -1)


def runner_at(model_dir: Path, base: ModelRunner, image_size: int) -> ModelRunner:
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    norm = normalization_of(configured_processor(str(model_dir), None, image_size=image_size))
    return ModelRunner(model, norm, base.device, torch.float32)


@pytest.fixture(scope="module")
def registers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("dinov2-registers"), "tiny", registers=4)


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("image_size", [224, 448])
def test_patch_tokens_equal_the_reference(
    model_dir: Path, registers_dir: Path, runner: ModelRunner, registers: bool, image_size: int
) -> None:
    folder = registers_dir if registers else model_dir
    served = runner_at(folder, runner, image_size)
    datas = [images.jpeg(300, 200), images.png(97, 131)]
    pixels = np.stack([decode(data, LIMITS, image_size) for data in datas])
    out = served.embed(pixels, [TokenOptions(), None])
    assert out.patches is not None and out.patches[1] is None
    tokens = out.patches[0]
    assert (tokens.rows, tokens.cols, tokens.dim) == (image_size // 14, image_size // 14, served.embedding_dim)
    assert tokens.values.dtype == np.dtype("<f4") and tokens.values.flags.c_contiguous
    assert_close(as_float32(tokens), reference_tokens(folder, datas[0], image_size), f"registers={registers}")
    mean = as_float32(tokens).reshape(-1, tokens.dim).mean(axis=0)
    assert_close(mean, out.mean[0], "the tokens' mean is the MEAN pooling")


def test_half_precision_and_normalized_tokens_are_the_float32_ones_rounded(runner: ModelRunner) -> None:
    pixels = np.stack([decode(images.jpeg(256, 256), LIMITS, runner.image_size)] * 3)
    asks = [TokenOptions("float32"), TokenOptions("float16", normalize=True), TokenOptions("bfloat16")]
    exact, half, brain = runner.embed(pixels, asks).patches  # type: ignore[misc]
    assert exact is not None and half is not None and brain is not None
    assert half.nbytes == brain.nbytes == exact.nbytes // 2 == runner.patch_token_bytes(asks[1])
    reference = as_float32(exact)
    unit = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
    assert np.array_equal(half.values, unit.astype(np.float16).view("<f2").reshape(half.values.shape))
    expected_bf16 = torch.from_numpy(reference).to(torch.bfloat16).float().numpy()
    assert np.array_equal(as_float32(brain), expected_bf16)


def test_a_split_batch_keeps_each_images_tokens(runner: ModelRunner) -> None:
    """Parts of a batch (as after running out of device memory) join back in order."""
    pixels = np.stack([decode(images.png(60 + 7 * k, 80), LIMITS, runner.image_size) for k in range(4)])
    asks: list[TokenOptions | None] = [None, TokenOptions(), None, TokenOptions("float16")]
    whole = runner.embed(pixels, asks)
    joined = BatchOutput.joined([runner.embed(pixels[:2], asks[:2]), runner.embed(pixels[2:], asks[2:])])
    assert joined.patches is not None and whole.patches is not None
    assert [p is None for p in joined.patches] == [True, False, True, False]
    for a, b in zip(whole.patches, joined.patches, strict=True):
        assert (a is None and b is None) or np.array_equal(as_float32(a), as_float32(b))  # type: ignore[arg-type]


def token_request(datas: list[bytes], dtype: int = pb.TOKEN_DTYPE_FLOAT32, normalize: bool = False) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        images=[pb.Image(data=d, id=f"img-{i}") for i, d in enumerate(datas)],
        patch_tokens=pb.PatchTokensOptions(enabled=True, dtype=dtype, normalize=normalize),
    )


def wire_tokens(tokens: pb.PatchTokens) -> np.ndarray:
    names = {pb.TOKEN_DTYPE_FLOAT32: "float32", pb.TOKEN_DTYPE_FLOAT16: "float16", pb.TOKEN_DTYPE_BFLOAT16: "bfloat16"}
    dtype = names[tokens.dtype]
    view = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[dtype]
    values = np.frombuffer(tokens.data, dtype=view).reshape(tokens.rows * tokens.cols, tokens.dim)
    return as_float32(PatchTokens(tokens.rows, tokens.cols, dtype, values))


def test_embed_returns_patch_tokens_beside_the_embedding(server: RunningServer, model_dir: Path) -> None:
    good = images.jpeg(320, 240)
    response = server.stub.Embed(token_request([good, b"not an image", good], pb.TOKEN_DTYPE_FLOAT16), timeout=60)
    first, bad, third = response.embeddings
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not bad.HasField("patch_tokens")
    assert first.values and (first.patch_tokens.rows, first.patch_tokens.cols) == (16, 16)
    assert first.patch_tokens.dtype == pb.TOKEN_DTYPE_FLOAT16 and first.patch_tokens.data == third.patch_tokens.data
    assert len(first.patch_tokens.data) == 16 * 16 * first.patch_tokens.dim * 2
    expected = reference_tokens(model_dir, good, 224)
    np.testing.assert_allclose(wire_tokens(first.patch_tokens), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    plain = server.stub.Embed(pb.EmbedRequest(images=[pb.Image(data=good)]), timeout=60).embeddings[0]
    assert not plain.HasField("patch_tokens") and list(plain.values) == list(first.values)


def test_stream_answers_patch_tokens_and_normalizes_them(server: RunningServer) -> None:
    requests = [token_request([images.png(90, 90)], pb.TOKEN_DTYPE_BFLOAT16, normalize=True), token_request([])]
    answered, refused = server.stub.EmbedStream(iter(requests), timeout=60)
    tokens = wire_tokens(answered.embeddings[0].patch_tokens)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-2)
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_patch_request_over_the_message_limit_is_refused_with_the_fix(make_server, runner: ModelRunner) -> None:
    each = runner.patch_token_bytes(TokenOptions())  # 16 * 16 * 32 * 4 = 32 KiB with the tiny model
    small = make_server(max_request_bytes=3 * each + each // 2)
    with pytest.raises(grpc.RpcError) as refused:
        small.stub.Embed(token_request([images.png()] * 4), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the message limit" in (refused.value.details() or "")
    half = small.stub.Embed(token_request([images.png()] * 4, pb.TOKEN_DTYPE_FLOAT16), timeout=30)
    assert len(half.embeddings) == 4 and all(e.patch_tokens.data for e in half.embeddings)
    assert small.stub.Info(pb.InfoRequest(), timeout=10).patch_size == 14


def test_the_engine_refuses_tokens_that_no_response_can_carry(make_server, runner: ModelRunner) -> None:
    """Whatever the transport: the service's own bound names the images that fit and the half-size types."""
    from server.errors import InvalidRequest
    from server.service import EmbedOptions

    each = runner.patch_token_bytes(TokenOptions())
    small = make_server(max_request_bytes=2 * each)

    async def ask() -> None:
        await small.server.service.embed([images.png()] * 3, EmbedOptions(patch_tokens=TokenOptions()))

    with pytest.raises(InvalidRequest) as refused:
        small.call(ask)
    assert "send at most 2 images per request, or ask for float16 or bfloat16" in str(refused.value)
