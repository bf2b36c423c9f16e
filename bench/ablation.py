"""What each fast path gives: the runner's throughput with them switched on one after another, in one run.

The variants are measured in interleaved rounds, each round's rate from
its median forward pass, and the best round kept: a burst of load on a
shared machine slows one round of one step, not the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from bench.paths import rate
from server.config import Settings
from server.model import FastPaths, ModelRunner

PLAIN = FastPaths(
    fold_input=False, cache_positions=False, fuse_qkv=False, fold_layer_scale=False, attention="sdpa", compile=False
)


@dataclass
class Step:
    name: str
    dtype: str
    fast: FastPaths
    images_per_s: float = 0.0
    min_cosine: float = 0.0


def steps(dtype: str, device: str, compile_too: bool) -> list[Step]:
    """Cumulative: transformers as loaded (float32, then dtype), then each fast path added."""
    out = [Step("transformers as loaded, float32", "float32", PLAIN)]
    fast = PLAIN
    if dtype != "float32":
        out.append(Step(f"transformers as loaded, {dtype}", dtype, fast))
    for name, change in (
        ("+ attention auto", {"attention": "auto"}),
        ("+ cached position embeddings", {"cache_positions": True}),
        ("+ folded uint8 input", {"fold_input": True}),
        ("+ fused q/k/v (and its attention)", {"fuse_qkv": True}),
        ("+ folded layer scale", {"fold_layer_scale": True}),
        ("+ torch.compile", {"compile": True}),
    ):
        if name == "+ torch.compile" and not compile_too:
            continue
        fast = dataclasses.replace(fast, **change)
        out.append(Step(name, dtype, fast))
    return out


def ablate(
    settings: Settings,
    pixels: np.ndarray,
    reference: list[np.ndarray],
    batch_size: int,
    seconds: float,
    compile_too: bool = False,
    rounds: int = 6,
) -> list[Step]:
    """Measures every step at `batch_size` and its cosine to the float32 reference CLS embeddings; `settings`
    name the model, device, dtype and served input (each step sets its own dtype)."""
    plan = steps(settings.dtype, settings.device, compile_too)
    runners = [ModelRunner.load(dataclasses.replace(settings, dtype=s.dtype), s.fast) for s in plan]
    for step, runner in zip(plan, runners, strict=True):
        cls = runner.embed(pixels[: len(reference)]).cls
        step.min_cosine = min(_cosine(a, b) for a, b in zip(cls, reference, strict=True))
    for _ in range(rounds):
        for step, runner in zip(plan, runners, strict=True):
            step.images_per_s = max(step.images_per_s, rate(runner, pixels, batch_size, seconds / rounds))
    return plan


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
