"""The model runner: a batch of resized grayscale pixels in, pooled embeddings out.

It knows nothing of requests or transports. It is loaded once, called from
one thread at a time (the batcher's), and returns float32 numpy arrays.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np
import torch

from server.config import Settings
from server.errors import ModelLoadError
from server.preprocess import Normalization, configured_processor, normalization_of

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


class ModelRunner:
    """A loaded DINOv2 model and the arithmetic that turns uint8 pixels into its input."""

    def __init__(self, model: torch.nn.Module, norm: Normalization, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.norm = norm
        self.device = device
        self.dtype = dtype
        config = model.config
        self.embedding_dim: int = int(config.hidden_size)
        self._first_patch = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self._mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, settings: Settings) -> ModelRunner:
        """Loads model and processor with `from_pretrained` (Hub id or local folder)."""
        from transformers import AutoModel

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        norm = normalization_of(configured_processor(settings.model, settings.revision))
        try:
            model = AutoModel.from_pretrained(settings.model, revision=settings.revision, dtype=dtype)
        except OSError as exc:
            raise ModelLoadError.cannot_load(settings.model, exc) from None
        runner = cls(model, norm, device, dtype)
        log.info(
            "loaded %s (revision %s): dim %d, image %dx%d, dtype %s (asked %s), device %s (asked %s)",
            settings.model, settings.revision or "default", runner.embedding_dim, norm.image_size,
            norm.image_size, runner.dtype_name, settings.dtype, device, settings.device,
        )  # fmt: skip
        return runner

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def image_size(self) -> int:
        return self.norm.image_size

    def pixel_values(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [B, S, S] grayscale -> normalized [B, 3, S, S] in the model's dtype, on its device."""
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True).unsqueeze(1).float()
        x = (x * self.norm.rescale - self._mean) / self._std
        return x.to(self.dtype)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> BatchOutput:
        """Runs one forward pass over a batch of resized grayscale images."""
        out = self.model(pixel_values=self.pixel_values(pixels))
        hidden = out.last_hidden_state
        cls_token = out.pooler_output if out.pooler_output is not None else hidden[:, 0]
        patch_mean = hidden[:, self._first_patch :].float().mean(dim=1)
        return BatchOutput(
            cls=cls_token.float().cpu().numpy(),
            mean=patch_mean.cpu().numpy(),
        )

    def warmup(self) -> None:
        """One forward pass, so the first caller does not pay for lazy initialisation."""
        size = self.norm.image_size
        self.embed(np.zeros((1, size, size), dtype=np.uint8))
