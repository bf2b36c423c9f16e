"""What one image costs the model, and what the machine can do: FLOPs and matmul GFLOP/s.

FLOPs count 2 x multiply-accumulates of the matmuls only (patch embedding,
q/k/v/o projections, MLP, the two attention matmuls); layer norms, softmax and
activations are left out. dinov2-small at 224x224 (257 tokens) is 12.25 GFLOP.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def model_flops(config: Any, image_size: int = 224) -> float:
    """FLOPs of one forward pass of one image, from a Dinov2Config."""
    dim = int(config.hidden_size)
    patch = int(config.patch_size)
    channels = int(config.num_channels)
    patches = (image_size // patch) ** 2
    tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0) + patches
    hidden = int(dim * config.mlp_ratio)
    if getattr(config, "use_swiglu_ffn", False):
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        mlp = 3 * tokens * dim * hidden
    else:
        mlp = 2 * tokens * dim * hidden
    projections = 4 * tokens * dim * dim
    attention = 2 * tokens * tokens * dim
    layer = projections + mlp + attention
    embed = patches * channels * patch * patch * dim
    return 2.0 * (embed + int(config.num_hidden_layers) * layer)


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int], seconds: float, device: str = "cpu") -> float:
    """Dense torch.matmul throughput [m, k] @ [k, n] in dtype, best of repeated timed runs."""
    m, k, n = shape
    a = torch.randn(m, k).to(device=device, dtype=dtype)
    b = torch.randn(k, n).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - started)
        if time.perf_counter() >= deadline:
            break
    return 2.0 * m * k * n / best / 1e9


def matmul_peak(
    dtype: torch.dtype, shapes: list[tuple[int, int, int]], seconds: float, device: str = "cpu"
) -> dict[str, float]:
    """GFLOP/s per shape ("MxKxN"); the machine's ceiling is the largest."""
    return {"x".join(map(str, s)): matmul_gflops(dtype, s, seconds / len(shapes), device) for s in shapes}
