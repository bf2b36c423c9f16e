"""The model runner: a batch of resized grayscale pixels in, pooled embeddings out.

It knows nothing of requests or transports. It is loaded once, called from
one thread at a time (the batcher's), and returns float32 numpy arrays.
The fast paths of server/fastpath.py are applied at load (`FastPaths`); each
keeps the float32 parity with the reference pipeline.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np
import torch

from server import fastpath
from server.config import Settings
from server.errors import ModelLoadError
from server.preprocess import Normalization, configured_processor, normalization_of
from server.runtime import ComputeThread, shared_compute_thread, tune_malloc
from server.source import check_supported, locate

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Pooling(enum.Enum):
    CLS = "cls"
    MEAN = "mean"
    CLS_MEAN = "cls_mean"


@dataclass(frozen=True)
class BatchOutput:
    """Per image of a batch: the CLS token and the mean of the patch tokens, float32 [B, D]."""

    cls: np.ndarray
    mean: np.ndarray


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
    ) -> None:
        self.fast = fast or FastPaths()
        self.norm = norm
        self.device = device
        self.dtype = dtype
        config = model.config
        self.embedding_dim: int = int(config.hidden_size)
        self.attention = self.fast.attention_for(device, dtype)
        self._first_patch = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self._mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
        self._compute = compute or shared_compute_thread()
        self.model: torch.nn.Module = self._compute.run(self._prepare, model)
        self._forward = torch.compile(self.model, dynamic=True) if self.fast.compile else self.model

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
        check_supported(source)
        norm = normalization_of(configured_processor(source.model, source.revision, source.local_files_only))
        tune_malloc()
        compute = compute or shared_compute_thread()
        try:
            model = compute.run(
                lambda: AutoModel.from_pretrained(source.model, dtype=torch.float32, **source.kwargs())
            )
        except OSError as exc:
            raise ModelLoadError.cannot_load(settings.model, exc) from None
        runner = cls(model, norm, device, dtype, fast, compute)
        log.info(
            "loaded %s (revision %s): dim %d, image %dx%d, dtype %s (asked %s), device %s (asked %s), "
            "attention %s, compile %s",
            settings.model, settings.revision or "default", runner.embedding_dim, norm.image_size,
            norm.image_size, runner.dtype_name, settings.dtype, device, settings.device,
            runner.attention, fast.compile,
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

    def pixel_values(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [B, S, S] grayscale -> the model's input in its dtype, on its device.

        With the folded input that is the pixels as they are, [B, 1, S, S];
        otherwise replicated and normalized, [B, 3, S, S].
        """
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True).unsqueeze(1)
        if self.fast.fold_input:
            return x.float()  # the folded conv runs in float32
        x = (x.float() * self.norm.rescale - self._mean) / self._std
        return x.to(self.dtype)

    def embed(self, pixels: np.ndarray) -> BatchOutput:
        """Runs one forward pass over a batch of resized grayscale images, on the compute thread."""
        return self._compute.run(self._embed, pixels)

    @torch.inference_mode()
    def _embed(self, pixels: np.ndarray) -> BatchOutput:
        out = self._forward(pixel_values=self.pixel_values(pixels))
        hidden = out.last_hidden_state
        cls_token = out.pooler_output if out.pooler_output is not None else hidden[:, 0]
        patch_mean = hidden[:, self._first_patch :].float().mean(dim=1)
        return BatchOutput(
            cls=cls_token.float().cpu().numpy(),
            mean=patch_mean.cpu().numpy(),
        )

    def warmup(self) -> None:
        """Forward passes so the first caller does not pay for lazy initialisation.

        Compiled, a batch of one and a batch of two: torch.compile specialises
        size 1 and builds one dynamic-batch graph for the rest.
        """
        size = self.norm.image_size
        for batch in (1, 2) if self.fast.compile else (1,):
            self.embed(np.zeros((batch, size, size), dtype=np.uint8))
