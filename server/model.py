"""The model runner: a batch of resized grayscale pixels in, pooled embeddings out.

It knows nothing of requests or transports. It is loaded once, runs all of
its PyTorch work on its compute thread, and returns float32 numpy arrays.
The fast paths of server/fastpath.py are applied at load (`FastPaths`); each
keeps the float32 parity with the reference pipeline. Batches go to the
device through pinned buffers (server/staging.py); the batch limit is
resolved at load (`--max-batch-size auto`, server/batch_size.py) and lowered
for good when a CUDA batch runs out of memory, after splitting that batch.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from server import batch_size, fastpath, resize
from server.config import Settings
from server.errors import ModelLoadError
from server.preprocess import Normalization, model_input
from server.runtime import ComputeThread, shared_compute_thread, tune_malloc
from server.source import check_supported, locate
from server.staging import Staging
from server.tokens import PatchTokens, TokenOptions, to_host

log = logging.getLogger(__name__)

Pixels = np.ndarray | Sequence[np.ndarray]
"""A batch of uint8 grayscale images: one [B, N, N] array, or B arrays of [N, N] or, at full size
(`full_size=True`), of any [H, W] (the runner resizes those on its device, bit-exact: server/resize.py)."""
Tokens = Sequence[TokenOptions | None] | None
"""Per image of a batch, the patch tokens it asks for (None: none); None for the whole batch: none at all."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Pooling(enum.Enum):
    CLS = "cls"
    MEAN = "mean"
    CLS_MEAN = "cls_mean"

    def size(self, embedding_dim: int) -> int:
        """Values of an embedding pooled this way: the model's width, or both halves for CLS_MEAN."""
        return 2 * embedding_dim if self is Pooling.CLS_MEAN else embedding_dim


@dataclass(frozen=True)
class BatchOutput:
    """Per image of a batch: the CLS token and the mean of the patch tokens, float32 [B, D], and the
    patch tokens of the images that asked for them (None for the others, or for all when none did)."""

    cls: np.ndarray
    mean: np.ndarray
    patches: list[PatchTokens | None] | None = None

    @staticmethod
    def joined(parts: Sequence[BatchOutput]) -> BatchOutput:
        """The parts of a split batch as one output, in order."""
        if len(parts) == 1:
            return parts[0]
        patches = None
        if any(part.patches is not None for part in parts):
            patches = [p for part in parts for p in (part.patches or [None] * len(part.cls))]
        return BatchOutput(np.concatenate([p.cls for p in parts]), np.concatenate([p.mean for p in parts]), patches)


def pool(cls_token: np.ndarray, patch_mean: np.ndarray, pooling: Pooling, normalize: bool) -> np.ndarray:
    """One image's embedding from its CLS token and patch mean."""
    if pooling is Pooling.CLS:
        vec = cls_token
    elif pooling is Pooling.MEAN:
        vec = patch_mean
    else:
        vec = np.concatenate([cls_token, patch_mean])
    if normalize:
        norm = float(np.linalg.norm(vec))
        vec = vec / norm if norm > 0 else vec
    return np.ascontiguousarray(vec, dtype=np.float32)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU (exact), bfloat16 on a CUDA GPU that has it, else float16."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class FastPaths:
    """Which rewrites of server/fastpath.py the runner applies; the defaults are what the server runs.

    attention: `auto` = eager on CPU in bfloat16/float16 (about 3x faster than
    PyTorch's CPU flash kernel there), else `sdpa` (transformers' default).
    compile: `torch.compile` the model (slow start, off by default).
    """

    fold_input: bool = True
    cache_positions: bool = True
    fuse_qkv: bool = True
    fold_layer_scale: bool = True
    attention: str = "auto"
    compile: bool = False

    def attention_for(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.attention != "auto":
            return self.attention
        return "eager" if device.type == "cpu" and dtype != torch.float32 else "sdpa"


class ModelRunner:
    """A loaded DINOv2 model and the arithmetic that turns uint8 pixels into its input."""

    def __init__(
        self,
        model: torch.nn.Module,
        norm: Normalization,
        device: torch.device,
        dtype: torch.dtype,
        fast: FastPaths | None = None,
        compute: ComputeThread | None = None,
        max_batch_size: int | str = "auto",
    ) -> None:
        self.fast = fast or FastPaths()
        self.norm = norm
        self.device = device
        self.dtype = dtype
        config = model.config
        self.embedding_dim: int = int(config.hidden_size)
        self.attention = self.fast.attention_for(device, dtype)
        self._first_patch = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.patch_size: int = int(config.patch_size)
        self._mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
        self._compute = compute or shared_compute_thread()
        self.model: torch.nn.Module = self._compute.run(self._prepare, model)
        self._forward = torch.compile(self.model, dynamic=True) if self.fast.compile else self.model
        self._staging = Staging(device, norm.image_size)
        self._configured_batch = batch_size.parse(max_batch_size)
        self._oom_limit: int | None = None  # set when a batch ran out of device memory
        self._warmed = False
        if self._configured_batch == "auto":
            log.debug("max batch size auto: %d", self.auto_batch_size)  # on CUDA measured now, not on a request

    def _prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Applies the fast paths and casts and moves the model (on the compute thread).

        The weight folds (input, q/k/v, LayerScale) are computed from the
        loaded weights before the cast, so in bfloat16/float16 each folded
        weight is rounded once, as a half-precision checkpoint of the folded
        model would be; the position cache is interpolated after it, as
        transformers does from the cast table.
        """
        projection = model.embeddings.patch_embeddings.projection
        folded = fastpath.folded_projection(projection, self.norm) if self.fast.fold_input else None
        if self.fast.fuse_qkv:
            fastpath.fuse_qkv(model)
        if self.fast.fold_layer_scale:
            fastpath.fold_layer_scale(model)
        model = model.to(device=self.device, dtype=self.dtype).eval()
        if folded is not None:
            fastpath.fold_input(model, folded, self.dtype)
        if self.fast.cache_positions:
            fastpath.cache_positions(model, self.norm.image_size)
        fastpath.use_attention(model, self.attention)
        return model

    @classmethod
    def load(
        cls, settings: Settings, fast: FastPaths | None = None, compute: ComputeThread | None = None
    ) -> ModelRunner:
        """Loads model and processor with `from_pretrained` (Hub id or local folder).

        Where the model comes from is settled first, and a model that is not
        DINOv2 refused (server/source.py), so a start that cannot succeed ends
        in seconds with one line. The weights are loaded in float32 and cast
        after the weight folds (`_prepare`). Loading, like every forward pass,
        runs on the compute thread (by default the process's shared one,
        server/runtime.py).
        """
        from transformers import AutoModel

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        fast = fast or FastPaths(compile=settings.compile == "on")
        source = locate(settings.model, settings.revision, settings.hub_timeout_s)
        config = check_supported(source)
        norm = model_input(source.model, source.revision, source.local_files_only, settings.image_size,
                           settings.preprocess, int(config.get("patch_size", 14)))  # fmt: skip
        tune_malloc()
        compute = compute or shared_compute_thread()
        try:
            model = compute.run(lambda: AutoModel.from_pretrained(source.model, dtype=torch.float32, **source.kwargs()))
        except OSError as exc:
            raise ModelLoadError.cannot_load(settings.model, exc) from None
        runner = cls(model, norm, device, dtype, fast, compute, settings.max_batch_size)
        log.info(
            "loaded %s (revision %s): dim %d, image %dx%d (preprocess %s: %s), dtype %s (asked %s), device %s "
            "(asked %s), attention %s, compile %s, max batch %d (asked %s)",
            settings.model, settings.revision or "default", runner.embedding_dim, norm.image_size,
            norm.image_size, settings.preprocess, norm.geometry.describe(), runner.dtype_name, settings.dtype,
            device, settings.device, runner.attention, fast.compile, runner.max_batch_size, settings.max_batch_size,
        )  # fmt: skip
        return runner

    @property
    def compute(self) -> ComputeThread:
        """The thread that runs all of this model's PyTorch work."""
        return self._compute

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def image_size(self) -> int:
        return self.norm.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Rows and columns of patch tokens per image."""
        side = self.image_size // self.patch_size
        return side, side

    def patch_token_bytes(self, options: TokenOptions) -> int:
        """Bytes of one image's patch tokens in `options.dtype`."""
        rows, cols = self.patch_grid
        return rows * cols * self.embedding_dim * options.itemsize

    @property
    def max_batch_size(self) -> int:
        """The most images this runner takes in one forward pass (the setting it was loaded with)."""
        return self.batch_limit(self._configured_batch)

    def batch_limit(self, configured: int | str = "auto") -> int:
        """The batch limit for a batch-size setting: `auto` resolved for this device, lowered after an OOM."""
        size = self.auto_batch_size if configured == "auto" else int(configured)
        return min(size, self._oom_limit) if self._oom_limit is not None else size

    @functools.cached_property
    def auto_batch_size(self) -> int:
        """16 on a CPU; on a CUDA device, measured once (server/batch_size.py)."""
        if self.device.type != "cuda":
            return batch_size.CPU_BATCH_SIZE
        return self._compute.run(batch_size.choose, self._measured_rate)

    def pixel_values(self, pixels: Pixels, full_size: bool = False) -> torch.Tensor:
        """uint8 grayscale images -> the model's input in its dtype, on its device.

        With the folded input that is the pixels as they are, [B, 1, N, N];
        otherwise replicated and normalized, [B, 3, N, N]. The copy to the
        device goes through a pinned buffer and does not wait (server/staging.py).
        A batch of `full_size` images (as the decode workers hand them back
        with `--resize-on device`) is copied as it is and resized (and
        cropped) there (server/resize.py), grouped by size. It is said, not
        guessed from the shapes: under `--preprocess checkpoint` an N x N
        image is resized and cropped too.
        """
        if full_size:
            x = resize.resize_batch(pixels, self.norm.geometry, self.device).unsqueeze(1)
        else:
            x = self._staging.to_device(pixels).unsqueeze(1)
        if self.fast.fold_input:
            return x.float()  # the folded conv runs in float32
        x = (x.float() * self.norm.rescale - self._mean) / self._std
        return x.to(self.dtype)

    def embed(self, pixels: Pixels, tokens: Tokens = None, full_size: bool = False) -> BatchOutput:
        """Runs a batch of grayscale images through the model, on the compute thread: resized ones, or
        `full_size` ones that it resizes first (`pixel_values`); `tokens`, per image, the patch tokens
        to return beside the pooled outputs.

        On CUDA a batch that runs out of memory is split and its parts run in
        turn (halving again as needed), and the batch limit is lowered to the
        size that fits for the rest of the run; only an image that does not
        fit alone fails.
        """
        return self._compute.run(self._embed, pixels, tokens, full_size)

    def _embed(self, pixels: Pixels, tokens: Tokens = None, full_size: bool = False) -> BatchOutput:
        count, start = len(pixels), 0
        limit_before = self._oom_limit
        parts: list[BatchOutput] = []
        while start < count:
            size = min(count - start, self._oom_limit or count)
            part_tokens = tokens[start : start + size] if tokens is not None else None
            output = self._forward_or_oom(pixels[start : start + size], part_tokens, full_size, splittable=size > 1)
            if output is None:
                self._oom_limit = size // 2
                continue
            parts.append(output)
            start += size
        if self._oom_limit != limit_before:
            log.warning("CUDA out of memory on a batch of %d images: split and retried; batches are limited to %d "
                        "images from now on", count, self._oom_limit)  # fmt: skip
        return BatchOutput.joined(parts)

    def _forward_or_oom(self, pixels: Pixels, tokens: Tokens, full_size: bool, splittable: bool) -> BatchOutput | None:
        """One forward pass; None when it ran out of memory and the batch can be split.

        The error is dropped before memory is freed: its traceback holds the
        failed pass's activations.
        """
        try:
            return self._forward_batch(pixels, tokens, full_size)
        except torch.OutOfMemoryError:
            if not splittable:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None

    @torch.inference_mode()
    def _forward_batch(self, pixels: Pixels, tokens: Tokens = None, full_size: bool = False) -> BatchOutput:
        out = self._forward(pixel_values=self.pixel_values(pixels, full_size))
        hidden = out.last_hidden_state
        cls_token = out.pooler_output if out.pooler_output is not None else hidden[:, 0]
        patches = hidden[:, self._first_patch :]
        patch_mean = patches.float().mean(dim=1)
        both = torch.cat((cls_token.float(), patch_mean), dim=1).cpu().numpy()  # one copy back, not two
        wanted = self._patch_tokens(patches, tokens) if tokens is not None and any(tokens) else None
        return BatchOutput(cls=both[:, : self.embedding_dim], mean=both[:, self.embedding_dim :], patches=wanted)

    def _patch_tokens(self, patches: torch.Tensor, tokens: Sequence[TokenOptions | None]) -> list[PatchTokens | None]:
        """The patch tokens of the images that asked, one device-to-host copy per kind of ask."""
        rows, cols = self.patch_grid
        found: list[PatchTokens | None] = [None] * len(tokens)
        for options in set(filter(None, tokens)):
            picked = [row for row, asked in enumerate(tokens) if asked == options]
            chosen = patches if len(picked) == len(tokens) else patches[torch.tensor(picked, device=patches.device)]
            values = to_host(chosen, options)
            for row, image_values in zip(picked, values, strict=True):
                found[row] = PatchTokens(rows, cols, options.dtype, image_values)
        return found

    def _measured_rate(self, size: int, seconds: float = 0.25) -> float | None:
        """Images/s of batches of `size` (one pass to warm up, then at least three and `seconds`);
        None when it does not fit. A fast model's passes take a millisecond: a few are noise."""
        pixels = np.zeros((size, self.image_size, self.image_size), dtype=np.uint8)
        try:
            self._forward_batch(pixels)
            passes, started = 0, time.perf_counter()
            while passes < 3 or time.perf_counter() - started < seconds:
                self._forward_batch(pixels)  # its copy back to the host waits for the device
                passes += 1
            return passes * size / (time.perf_counter() - started)
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()
        return None

    def warmup(self) -> None:
        """Forward passes so that no caller pays for lazy initialisation.

        On CUDA, the first call runs every batch size the server will form,
        largest first (the allocator reserves the peak at once, and each
        shape's kernels are chosen now); later calls (the batcher's health
        probe) run a batch of one. On CPU, a batch of one; compiled, a batch
        of one and of two (torch.compile specialises size 1 and builds one
        dynamic-batch graph for the rest).
        """
        if self.device.type == "cuda" and not self._warmed:
            sizes: Sequence[int] = range(self.max_batch_size, 0, -1)
        else:
            sizes = (1, 2) if self.fast.compile else (1,)
        size = self.image_size
        for batch in sizes:
            self.embed(np.zeros((batch, size, size), dtype=np.uint8))
        self._warmed = True
