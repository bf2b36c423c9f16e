"""Where a model is loaded from, and whether it is one this server can serve.

`locate` settles, before any `from_pretrained` call, whether the model is a
local folder, a Hub copy in the local cache, or a Hub id that can be fetched,
and ends the start with one line when it is none of them. Without it, an
unreachable Hub costs about 90 s per file: huggingface_hub retries a failed
download five times with backoff (1, 2, 4, 8, 8 s), logging every try. The
probe here is one HEAD request, no retries, with a short timeout; once it has
answered, `from_pretrained` runs as usual (and may retry a transient error).

`check_supported` reads the model's config.json and refuses anything that is
not DINOv2: the fast paths of server/fastpath.py rewrite DINOv2's modules, and
a look-alike (ViT, say) would pool a different CLS token.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ModelLoadError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


@dataclass(frozen=True)
class ModelSource:
    """A model as `from_pretrained` should load it: name, revision, and whether to stay off the network."""

    model: str
    revision: str | None = None
    local_files_only: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments every `from_pretrained` of this model takes."""
        return {"revision": self.revision, "local_files_only": self.local_files_only}


@functools.lru_cache(maxsize=8)
def locate(model: str, revision: str | None, timeout_s: float) -> ModelSource:
    """Resolves `model` to a local folder, the Hub cache or the Hub; one clear ModelLoadError otherwise.

    Remembered per process, so the start's early check and the load probe the Hub once.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(str(path), revision)
    if path.exists():
        raise ModelLoadError(f"cannot load model {model!r}: it is a file; --model takes a folder or a Hub id")
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelLoadError(
            f"cannot load model {model!r}: there is no such folder, and it is not a Hub id (namespace/name)"
        ) from None
    cached = _in_cache(model, revision)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return ModelSource(model, revision, local_files_only=True)
        raise ModelLoadError.not_found(model, f"HF_HUB_OFFLINE is set and it is not in the cache ({_cache()})")
    problem = _probe(model, revision, timeout_s)
    if problem is None:
        return ModelSource(model, revision)
    if cached:
        log.warning("%s; loading %s from the cache (%s)", problem, model, _cache())
        return ModelSource(model, revision, local_files_only=True)
    raise ModelLoadError.not_found(model, f"{problem}, and it is not in the cache ({_cache()})")


def check_supported(source: ModelSource) -> dict[str, Any]:
    """Refuses, with one line, a model whose config.json is not a DINOv2's; returns the config it read
    (the patch size checks `--image-size` before any weight is loaded).

    It reads config.json itself (from the folder, or through the Hub cache):
    transformers' config classes would import torch, seconds before the answer.
    """
    try:
        config = json.loads(_config_file(source).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError.cannot_load(source.model, exc) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"cannot serve model {source.model!r}: its model_type is {model_type!r}; this server runs DINOv2 only "
            f"(model_type {' or '.join(SUPPORTED_MODEL_TYPES)}, e.g. facebook/dinov2-small, "
            "facebook/dinov2-with-registers-small)"
        )
    return config


def _config_file(source: ModelSource) -> Path:
    folder = Path(source.model)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError("the folder has no config.json")
        return folder / "config.json"
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source.model, "config.json", **source.kwargs()))


def _in_cache(model: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str)


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _probe(model: str, revision: str | None, timeout_s: float) -> str | None:
    """One HEAD of the model's config.json on the Hub, no retries; None when it answers, else what went wrong."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    try:
        get_hf_file_metadata(hf_hub_url(model, "config.json", revision=revision), timeout=timeout_s)
    except GatedRepoError:
        return f"{model} is gated on the Hub: accept its terms and log in (hf auth login, or HF_TOKEN)"
    except RepositoryNotFoundError:
        return f"the Hub ({endpoint}) has no model {model!r} (or it is private: log in, or set HF_TOKEN)"
    except RevisionNotFoundError:
        return f"the Hub ({endpoint}) has no revision {revision!r} of {model}"
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no"
        return f"the Hub ({endpoint}) answered HTTP {status} for {model}/config.json"
    except Exception as exc:  # connection refused, DNS, timeout, TLS: the Hub cannot be reached
        return f"the Hub ({endpoint}) cannot be reached within {timeout_s:g} s ({_first_line(exc)})"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
