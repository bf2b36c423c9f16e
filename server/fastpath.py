"""Graph surgery that makes a loaded DINOv2 cheaper without changing what it computes.

Each function rewrites one part of a Hugging Face `Dinov2Model` in place, and
each keeps the float32 parity rule of tests/test_model.py (max abs difference
<= 1e-4 x max |reference|):

- `folded_projection`, `fold_input`: the processor's grayscale replication, rescale and
  normalization folded into a 1-channel patch embedding, so the model takes
  the raw uint8 pixels (as floats) and no normalized 3-channel copy is built;
- `cache_positions`: the 37x37 position embeddings of the checkpoints
  interpolated once to the served size, by transformers' own code, instead of
  on every forward pass;
- `fuse_qkv`: the query, key and value projections as one matmul, the
  attention scale folded in, and a leaner eager attention;
- `fold_layer_scale`: DINOv2's LayerScale multiplies folded into the
  linear layers before them;
- `use_attention`: the attention kernel (`eager` is ~3x faster than PyTorch's
  CPU flash kernel in bfloat16; `sdpa` is transformers' default).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from server.preprocess import Normalization


def folded_projection(conv: nn.Conv2d, norm: Normalization) -> nn.Conv2d:
    """The patch embedding conv for 1-channel 0..255 pixels, in float32, from the float32 weights.

    The reference feeds conv(W, (x * rescale - mean_c) / std_c) over 3 equal
    channels c. That is conv(W', x) + b' with W' = sum_c W_c * rescale / std_c
    and b' = b - sum_c sum_kernel W_c * mean_c / std_c, computed in float64.
    Call it before the model is cast to half precision.
    """
    weight = conv.weight.detach().double()  # [D, 3, k, k]
    mean = torch.tensor(norm.mean, dtype=torch.float64, device=weight.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float64, device=weight.device).view(1, 3, 1, 1)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(weight[:, 0, 0, 0])
    folded = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    with torch.no_grad():
        folded.weight.copy_((weight * (norm.rescale / std)).sum(dim=1, keepdim=True))
        folded.bias.copy_(bias - (weight * (mean / std)).sum(dim=(1, 2, 3)))
    return folded.to(device=conv.weight.device).eval()


class Float32Projection(nn.Module):
    """A float32 conv inside a model of another dtype: pixels in, embeddings out in `out_dtype`.

    In bfloat16 the folded bias nearly cancels the weighted pixel sum, so the
    conv (1% of the FLOPs) stays in float32; its input 0..255 is exact.
    """

    def __init__(self, conv: nn.Conv2d, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.conv = conv.float()
        self.out_dtype = out_dtype

    @property
    def weight(self) -> torch.Tensor:  # Dinov2PatchEmbeddings casts its input to this dtype
        return self.conv.weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels.float()).to(self.out_dtype)


def fold_input(model: nn.Module, folded: nn.Conv2d, dtype: torch.dtype) -> None:
    """Installs a `folded_projection`: the model then takes [B, 1, S, S] pixel values in 0..255.

    Call it after the model has its final dtype and device.
    """
    embeddings = model.embeddings.patch_embeddings
    embeddings.projection = Float32Projection(folded.to(embeddings.projection.weight.device), dtype)
    embeddings.num_channels = 1


def cache_positions(model: nn.Module, image_size: int) -> None:
    """Interpolates the position embeddings once for image_size x image_size, with transformers' own code.

    Call it after the model has its final dtype and device: transformers
    interpolates from the stored (possibly half precision) table, and so does
    this, once. Other sizes still go through the original method.
    """
    embeddings = model.embeddings
    original = embeddings.interpolate_pos_encoding
    patches = (image_size // embeddings.patch_size) ** 2
    table = embeddings.position_embeddings
    probe = torch.empty(1, patches + 1, table.shape[-1], dtype=table.dtype, device=table.device)
    with torch.no_grad():
        cached = original(probe, image_size, image_size).detach().clone()

    def interpolate_pos_encoding(self: nn.Module, emb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if height == image_size and width == image_size and not torch.jit.is_tracing():
            return cached
        return original(emb, height, width)

    embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, embeddings)


def fuse_qkv(model: nn.Module) -> None:
    """Replaces each layer's q_proj, k_proj and v_proj with one linear layer of 3x the outputs.

    The attention scale head_dim**-0.5 is folded into the query rows (exact
    when it is a power of two, as for every DINOv2 size: 64-dim heads, 1/8).
    The new forward runs its own eager attention (one copy of q/k/v into
    [3, B*H, N, hd], bmm, softmax, bmm: no scaling pass over the N x N scores
    and no strided-matmul copies) when the model's attention is `eager`, and
    transformers' attention function otherwise.
    """
    for layer in model.encoder.layer:
        attention = layer.attention
        parts = (attention.q_proj, attention.k_proj, attention.v_proj)
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None)
        fused.to(device=parts[0].weight.device, dtype=parts[0].weight.dtype)
        scales = [attention.scaling, 1.0, 1.0]
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight.double() * k for p, k in zip(parts, scales, strict=True)]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias.double() * k for p, k in zip(parts, scales, strict=True)]))
        attention.qkv_proj = fused
        del attention.q_proj, attention.k_proj, attention.v_proj
        attention.forward = types.MethodType(_fused_attention_forward, attention)


def _fused_attention_forward(
    self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dinov2Attention.forward with one projection for q, k and v, the scale already in q."""
    from transformers.models.dinov2.modeling_dinov2 import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    batch, tokens = hidden_states.shape[:2]
    heads = self.num_attention_heads
    qkv = self.qkv_proj(hidden_states).view(batch, tokens, 3, heads, self.head_dim)
    if self.config._attn_implementation == "eager" and attention_mask is None:
        return self.o_proj(_bmm_attention(qkv)), None
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=1.0, **kwargs)
    return self.o_proj(out.reshape(batch, tokens, -1).contiguous()), weights


@torch.compiler.disable  # inductor would swap it for the CPU flash kernel: 3x slower in bfloat16
def _bmm_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Softmax attention of [B, N, 3, H, hd] q/k/v (scale already in q) -> [B, N, H * hd]."""
    batch, tokens, _, heads, head_dim = qkv.shape
    query, key, value = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * heads, tokens, head_dim).unbind(0)
    probs = torch.bmm(query, key.transpose(1, 2)).softmax(dim=-1)
    out = torch.bmm(probs, value).view(batch, heads, tokens, head_dim).transpose(1, 2)
    return out.reshape(batch, tokens, heads * head_dim)


def fold_layer_scale(model: nn.Module) -> None:
    """Folds each LayerScale (a per-channel multiply) into the linear layer before it.

    lambda * (W x + b) = (lambda W) x + lambda b: one elementwise pass over the
    hidden states less, twice per layer.
    """
    for layer in model.encoder.layer:
        attention_out = layer.attention.o_proj
        mlp = layer.mlp
        mlp_out = mlp.down_proj if hasattr(mlp, "down_proj") else mlp.fc2
        for scale_name, linear in (("layer_scale1", attention_out), ("layer_scale2", mlp_out)):
            scale = getattr(layer, scale_name).lambda1.detach().double()
            with torch.no_grad():
                linear.weight.copy_(linear.weight.double() * scale[:, None])
                if linear.bias is not None:
                    linear.bias.copy_(linear.bias.double() * scale)
            setattr(layer, scale_name, nn.Identity())


def use_attention(model: nn.Module, implementation: str) -> None:
    """Switches the attention kernel: `eager` (matmul, softmax, matmul) or `sdpa`."""
    model.set_attn_implementation(implementation)
