"""What a running engine is and accepts, as `Info` (gRPC), `/v1/info` (HTTP) and the metrics' model info report it."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from server.config import Settings
from server.model import ModelRunner


@dataclass(frozen=True)
class ServiceInfo:
    """What `Info` answers. image_size: the served N (the model's input is N x N); preprocess: how
    an image becomes it, card or checkpoint (server/geometry.py)."""

    model_id: str
    revision: str
    embedding_dim: int
    image_size: int
    preprocess: str
    dtype: str
    device: str
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_bytes: int
    max_queue_images: int
    max_queue_s: float
    server_version: str
    patch_size: int

    @classmethod
    def of(cls, settings: Settings, runner: ModelRunner) -> ServiceInfo:
        """The info of an engine running `runner` under `settings`."""
        return cls(
            model_id=settings.model,
            revision=settings.revision or "",
            embedding_dim=runner.embedding_dim,
            image_size=runner.image_size,
            preprocess=settings.preprocess,
            dtype=runner.dtype_name,
            device=str(runner.device),
            max_batch_size=runner.batch_limit(settings.max_batch_size),
            max_images_per_request=settings.max_images_per_request,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_request_bytes=settings.max_request_bytes,
            max_queue_images=settings.max_queue_images,
            max_queue_s=settings.max_queue_s,
            server_version=_package_version(),
            patch_size=runner.patch_size,
        )


def served_model_name(settings: Settings) -> str:
    """The name answers give the model (`--served-model-name`): by default `--model` itself when it is a
    Hub id, else the local folder's name (`dinov2-small` for /models/dinov2-small): a path is the
    server's business, and callers cannot know it (/opt/model in the container)."""
    if settings.served_model_name:
        return settings.served_model_name
    folder = Path(settings.model).expanduser()
    return (folder.resolve().name or settings.model) if folder.is_dir() else settings.model


def _package_version() -> str:
    try:
        return version("dinov2-embed")
    except PackageNotFoundError:
        return "unknown"
