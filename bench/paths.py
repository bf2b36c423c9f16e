"""The in-process paths: the model alone on ready tensors (raw), and the seed's handler (seed-style)."""

from __future__ import annotations

import base64
import io
import json
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from server.model import ModelRunner


@dataclass
class RawResult:
    """Images/s per batch size of `ModelRunner.embed` on ready uint8 pixels; the best is the limit."""

    by_batch_size: dict[int, float]
    batch1_ms: float  # median time of one forward pass of one image

    @property
    def best_batch_size(self) -> int:
        return max(self.by_batch_size, key=self.by_batch_size.__getitem__)

    @property
    def images_per_s(self) -> float:
        return self.by_batch_size[self.best_batch_size]


def time_batches(runner: ModelRunner, pixels: np.ndarray, batch_size: int, seconds: float) -> list[float]:
    """Seconds of each forward pass of `batch_size` images, run for about `seconds` after two warm-ups."""
    batch = np.ascontiguousarray(np.resize(pixels, (batch_size, *pixels.shape[1:])))
    runner.embed(batch)
    runner.embed(batch)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while not times or time.perf_counter() < deadline:
        started = time.perf_counter()
        runner.embed(batch)
        times.append(time.perf_counter() - started)
    return times


def rate(runner: ModelRunner, pixels: np.ndarray, batch_size: int, seconds: float) -> float:
    """Images/s of back-to-back forward passes, from the median pass (robust to bursts of other load)."""
    return batch_size / statistics.median(time_batches(runner, pixels, batch_size, seconds))


def raw(runner: ModelRunner, pixels: np.ndarray, batch_sizes: list[int], seconds: float, passes: int = 2) -> RawResult:
    """The model's own throughput at each batch size (pixels already decoded and resized).

    The batch sizes are tried in `passes` interleaved passes of seconds / passes each; the best pass counts.
    """
    by_size = dict.fromkeys(batch_sizes, 0.0)
    batch1_s = float("inf")
    for _ in range(passes):
        for size in batch_sizes:
            by_size[size] = max(by_size[size], rate(runner, pixels, size, seconds / passes))
        one = time_batches(runner, pixels, 1, max(seconds / passes / 4, 0.05))
        batch1_s = min(batch1_s, statistics.median(one))
    return RawResult(by_size, 1000 * batch1_s)


@dataclass
class SeedResult:
    images_per_s: float
    embeddings: list[np.ndarray] = field(repr=False)  # the float32 reference CLS of each image


class SeedHandler:
    """The seed's request handler, in-process: one image per call, base64 JSON in and out, float32.

    json.loads -> base64 -> PIL -> convert("L") -> the configured processor ->
    AutoModel in float32 on a batch of one -> list -> json.dumps. Its output
    is also the float32 reference embedding (POOLING_CLS) the other paths are
    compared with.
    """

    def __init__(self, model_dir: str, image_size: int | None = None, preprocess: str = "card") -> None:
        from transformers import AutoModel

        from server.preprocess import configured_processor

        self.processor = configured_processor(model_dir, None, image_size=image_size, preprocess=preprocess)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    @staticmethod
    def payload(data: bytes) -> str:
        return json.dumps({"input": {"image": base64.b64encode(data).decode("ascii")}})

    @torch.inference_mode()
    def __call__(self, payload: str) -> str:
        body = json.loads(payload)
        img = Image.open(io.BytesIO(base64.b64decode(body["input"]["image"]))).convert("L")
        pixel_values = self.processor(img, return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixel_values)
        return json.dumps({"output": {"embedding": out.pooler_output[0].tolist()}})


def seed_style(handler: SeedHandler, datas: list[bytes]) -> SeedResult:
    """Calls the handler once per image after one warm-up call; images/s from the median call.

    Payloads are built before timing (that is the caller's work).
    """
    payloads = [handler.payload(data) for data in datas]
    handler(payloads[0])
    answers, times = [], []
    for payload in payloads:
        started = time.perf_counter()
        answers.append(handler(payload))
        times.append(time.perf_counter() - started)
    vectors = [np.asarray(json.loads(a)["output"]["embedding"], dtype=np.float32) for a in answers]
    return SeedResult(1 / statistics.median(times), vectors)
