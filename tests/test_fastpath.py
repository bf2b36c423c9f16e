"""Each fast path of server/fastpath.py alone keeps the float32 parity with the reference pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from server import fastpath
from server.config import Settings
from server.model import FastPaths, ModelRunner, Pooling
from server.preprocess import ImageLimits, decode
from tests.conftest import Reference, assert_close

LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=50_000_000)
NAMES = ["png_rgb", "jpeg_gray", "webp", "tiny_1x1", "exact_224", "png_16bit"]
PLAIN = FastPaths(fold_input=False, cache_positions=False, fuse_qkv=False, fold_layer_scale=False, attention="sdpa")
ONLY = {
    "plain": PLAIN,
    "fold_input": dataclasses.replace(PLAIN, fold_input=True),
    "cache_positions": dataclasses.replace(PLAIN, cache_positions=True),
    "fuse_qkv": dataclasses.replace(PLAIN, fuse_qkv=True),
    "fuse_qkv_eager": dataclasses.replace(PLAIN, fuse_qkv=True, attention="eager"),
    "fold_layer_scale": dataclasses.replace(PLAIN, fold_layer_scale=True),
    "eager": dataclasses.replace(PLAIN, attention="eager"),
    "all_eager": FastPaths(attention="eager"),
}


@pytest.mark.parametrize("name", list(ONLY))
def test_each_fast_path_keeps_float32_parity(
    settings: Settings, reference: Reference, corpus: dict[str, bytes], name: str
) -> None:
    runner = ModelRunner.load(settings, ONLY[name])
    out = runner.embed(np.stack([decode(corpus[n], LIMITS, runner.image_size) for n in NAMES]))
    for i, image in enumerate(NAMES):
        assert_close(out.cls[i], reference.embed(corpus[image], Pooling.CLS), f"{name} cls {image}")
        assert_close(out.mean[i], reference.embed(corpus[image], Pooling.MEAN), f"{name} mean {image}")


@pytest.mark.parametrize("size", [224, 448, 518])
def test_cached_positions_are_what_transformers_computes(model_dir: Path, size: int) -> None:
    """At every served size (518 is the checkpoint's own grid: transformers' table as it is)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    embeddings = model.embeddings
    tokens = (size // 14) ** 2 + 1
    probe = torch.zeros(1, tokens, model.config.hidden_size)
    expected = embeddings.interpolate_pos_encoding(probe, size, size)
    assert model.config.image_size == 518 and expected.shape == (1, tokens, model.config.hidden_size)
    fastpath.cache_positions(model, size)
    assert torch.equal(embeddings.interpolate_pos_encoding(probe, size, size), expected)
    assert embeddings.interpolate_pos_encoding(probe, size, size) is embeddings.interpolate_pos_encoding(
        probe, size, size
    )
    other = torch.zeros(1, 17, model.config.hidden_size)  # another size still interpolates
    assert embeddings.interpolate_pos_encoding(other, 56, 56).shape == (1, 17, model.config.hidden_size)


def test_folded_projection_equals_normalized_three_channel_conv(runner: ModelRunner, reference: Reference) -> None:
    conv = reference.model.embeddings.patch_embeddings.projection
    norm = runner.norm
    folded = fastpath.folded_projection(conv, norm)
    pixels = torch.randint(0, 256, (2, 1, 224, 224), dtype=torch.uint8).float()
    mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
    std = torch.tensor(norm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = conv((pixels.expand(-1, 3, -1, -1) * norm.rescale - mean) / std)
        actual = folded(pixels)
    assert folded.in_channels == 1
    assert float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def test_fused_qkv_replaces_three_projections(settings: Settings) -> None:
    runner = ModelRunner.load(settings, FastPaths(fuse_qkv=True))
    attention = runner.model.encoder.layer[0].attention
    dim = runner.embedding_dim
    assert attention.qkv_proj.weight.shape == (3 * dim, dim)
    assert not hasattr(attention, "q_proj")


def test_attention_auto_is_eager_for_half_precision_on_cpu_only() -> None:
    auto = FastPaths()
    assert auto.attention_for(torch.device("cpu"), torch.bfloat16) == "eager"
    assert auto.attention_for(torch.device("cpu"), torch.float32) == "sdpa"
    assert auto.attention_for(torch.device("cuda"), torch.bfloat16) == "sdpa"
    assert FastPaths(attention="sdpa").attention_for(torch.device("cpu"), torch.bfloat16) == "sdpa"


def test_bfloat16_folded_input_keeps_its_conv_in_float32(settings: Settings) -> None:
    runner = ModelRunner.load(dataclasses.replace(settings, dtype="bfloat16"))
    projection = runner.model.embeddings.patch_embeddings.projection
    assert projection.weight.dtype == torch.float32
    assert runner.model.encoder.layer[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert runner.pixel_values(np.zeros((2, 224, 224), np.uint8)).shape == (2, 1, 224, 224)


def test_folded_layer_scale_keeps_parity_with_learned_scales(model_dir: Path, runner: ModelRunner) -> None:
    """Random models have LayerScale 1.0; real checkpoints learn it, so give it random values here."""
    import copy

    model = learned_scales_model(model_dir)
    device, dtype = torch.device("cpu"), torch.float32
    plain = ModelRunner(copy.deepcopy(model), runner.norm, device, dtype, PLAIN)
    folded = ModelRunner(model, runner.norm, device, dtype, dataclasses.replace(PLAIN, fold_layer_scale=True))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8)
    expected, actual = plain.embed(pixels), folded.embed(pixels)
    for i in range(3):
        assert_close(actual.cls[i], expected.cls[i], f"cls {i}")
        assert_close(actual.mean[i], expected.mean[i], f"mean {i}")


def learned_scales_model(model_dir: Path) -> torch.nn.Module:
    """The tiny model with random LayerScale values (random models have 1.0; real checkpoints learn them)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.encoder.layer:
            for scale in (layer.layer_scale1, layer.layer_scale2):
                scale.lambda1.copy_(torch.rand(scale.lambda1.shape, generator=generator) * 2 - 0.5)
    return model


def test_half_precision_weights_are_folded_in_float32_and_rounded_once(model_dir: Path, runner: ModelRunner) -> None:
    """In bfloat16 each folded weight is the float32 fold rounded once, not a fold of rounded weights."""
    import copy

    model = learned_scales_model(model_dir)
    original = copy.deepcopy(model)
    half = ModelRunner(model, runner.norm, torch.device("cpu"), torch.bfloat16, FastPaths())
    for layer, before in zip(half.model.encoder.layer, original.encoder.layer, strict=True):
        attention = before.attention
        parts = [attention.q_proj.weight.double() * attention.scaling, attention.k_proj.weight, attention.v_proj.weight]
        expected = torch.cat([p.double() for p in parts]).to(torch.bfloat16)
        assert torch.equal(layer.attention.qkv_proj.weight, expected)
        for scale, out, out_before in (
            (before.layer_scale1, layer.attention.o_proj, attention.o_proj),
            (before.layer_scale2, layer.mlp.fc2, before.mlp.fc2),
        ):
            lam = scale.lambda1.double()
            assert torch.equal(out.weight, (out_before.weight.double() * lam[:, None]).to(torch.bfloat16))
            assert torch.equal(out.bias, (out_before.bias.double() * lam).to(torch.bfloat16))


def test_compiled_runner_keeps_float32_parity(
    settings: Settings, reference: Reference, corpus: dict[str, bytes]
) -> None:
    """torch.compile (--compile on): one dynamic-batch compile of the tiny model, about 10 s on 2 cores."""
    runner = ModelRunner.load(dataclasses.replace(settings, compile="on"))
    assert runner.fast.compile
    names = NAMES[:3]
    out = runner.embed(np.stack([decode(corpus[n], LIMITS, runner.image_size) for n in names]))
    for i, image in enumerate(names):
        assert_close(out.cls[i], reference.embed(corpus[image], Pooling.CLS), f"compiled cls {image}")
