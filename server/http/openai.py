"""`POST /v1/embeddings` in OpenAI's request and response shape, for clients written against OpenAI's API.

    {"input": "<data URL or base64>" or a list of them, "model": "...", "encoding_format": "float" | "base64",
     "dimensions": N, "user": "..."}
    -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] or "<base64>"}, ...],
        "model": "<the served model's name>", "usage": {"prompt_tokens": 0, "total_tokens": 0}}

As OpenAI's:
- embeddings have length 1 unless the request says `"normalize": false`, since
  OpenAI's clients compare them by dot product (`/v1/embed`, gRPC and RunPod
  answer them raw unless asked);
- `"base64"` is the embedding's little-endian float32 bytes;
- every error has OpenAI's shape, `{"error": {"message", "type", "param",
  "code"}}` (server/http/status.py), `param` naming the field at fault.

Where it differs:
- the inputs are images (data URLs or base64), not text, and `usage` counts 0 tokens;
- `model` is required by OpenAI's clients, so any value is accepted; the
  answer names the served model (`--served-model-name`, server/info.py);
- `dimensions` must equal the embedding's size: a DINOv2 embedding cannot be shortened;
- the shape has no per-item error: when any image fails, the request fails
  with the status of the first failure, and the message names each failing
  input (the first five) and points to /v1/embed, which answers per image;
- `/v1/embed`'s options (`pooling`, `normalize`) and `timeout_ms` are taken too.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import errors
from server.http.bodies import timeout_ms
from server.http.status import HttpError, status_of
from server.json_jobs import OPTION_KEYS, ImageText, code_of, failures, given_keys, json_type, parse_options, shown
from server.model import Pooling
from server.service import EmbedOptions, ImageResult

KEYS = ("input", "model", "encoding_format", "dimensions", "user", *OPTION_KEYS, "timeout_ms")
ENCODINGS = ("float", "base64")
LISTED_FAILURES = 5
_USAGE = {"prompt_tokens": 0, "total_tokens": 0}  # images are not tokens
DEFAULT_OPTIONS = {"normalize": True}
"""Where this route's defaults differ from `/v1/embed`'s: OpenAI's embeddings have length 1."""


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A checked `/v1/embeddings` request: its images (base64 strings), options, encoding and timeout."""

    inputs: list[ImageText]
    single: bool
    options: EmbedOptions
    encoding: str
    timeout_ms: float | None


def output_dim(options: EmbedOptions, embedding_dim: int) -> int:
    return 2 * embedding_dim if options.pooling == Pooling.CLS_MEAN else embedding_dim


def parse_request(raw: Any, max_images: int, embedding_dim: int) -> EmbeddingsRequest:
    """Checks the whole request before any work starts; `InvalidRequest` says what is wrong."""
    given = given_keys(raw, KEYS, 'body must be an object with "input"', "body")
    if "input" not in given:
        raise errors.InvalidRequest('body needs "input": an image as a data URL or base64, or a list of them', "input")
    single = isinstance(given["input"], str | memoryview)
    inputs = [given["input"]] if single else _input_list(given["input"], max_images)
    if "model" in given and not isinstance(given["model"], str):
        raise errors.InvalidRequest(f'"model" must be a string, not {json_type(given["model"])}', "model")
    encoding = given.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        said = shown(encoding) if isinstance(encoding, str) else json_type(encoding)
        raise errors.InvalidRequest(f'"encoding_format" must be float or base64, not {said}', "encoding_format")
    options = parse_options({**DEFAULT_OPTIONS, **given})
    dim = output_dim(options, embedding_dim)
    if "dimensions" in given and (given["dimensions"] != dim or isinstance(given["dimensions"], bool)):
        said = given["dimensions"] if isinstance(given["dimensions"], int) else json_type(given["dimensions"])
        raise errors.InvalidRequest(
            f'"dimensions" must be {dim}, this model\'s embedding size, not {said}: leave it out, or send {dim}',
            "dimensions",
        )
    return EmbeddingsRequest(inputs, single, options, encoding, timeout_ms(given.get("timeout_ms")))


def _input_list(value: Any, limit: int) -> list[ImageText]:
    if not isinstance(value, list):
        raise errors.InvalidRequest(
            f'"input" must be an image as a data URL or base64, or a list of them, not {json_type(value)}', "input"
        )
    if not value:
        raise errors.InvalidRequest('"input" is empty: send at least one image', "input")
    if len(value) > limit:
        raise errors.InvalidRequest(f'"input" has {len(value)} items, over the limit of {limit} per request', "input")
    for index, item in enumerate(value):
        if not isinstance(item, str | memoryview):
            raise errors.InvalidRequest(
                f"input[{index}] must be a data URL or base64 string, not {json_type(item)} "
                "(token arrays are for text models)",
                "input",
            )
    return value


def failure(results: Sequence[ImageResult], single: bool) -> HttpError | None:
    """The refusal of a request with a failed image (the first one's status), or None when all were embedded."""
    failed = failures(results)
    if not failed:
        return None
    first = failed[0][1]
    param = "input" if isinstance(first, errors.InvalidImage) else None  # else the server's failure, not the input's
    if single:
        return HttpError(status_of(first), code_of(first), f"input: {first}", param=param)
    listed = "; ".join(f"input[{index}]: {code_of(exc)}: {exc}" for index, exc in failed[:LISTED_FAILURES])
    more = f"; and {len(failed) - LISTED_FAILURES} more" if len(failed) > LISTED_FAILURES else ""
    return HttpError(
        status_of(first),
        code_of(first),
        f"{len(failed)} of {len(results)} inputs failed: {listed}{more} "
        "(POST /v1/embed answers the others and an error per failed image)",
        param=param,
    )


def response(results: Sequence[ImageResult], model_name: str, encoding: str) -> dict[str, Any]:
    """The answer to a request whose every image was embedded, naming the model `model_name`."""
    data = []
    for index, result in enumerate(results):
        assert result.embedding is not None
        data.append({"object": "embedding", "index": index, "embedding": _encoded(result.embedding, encoding)})
    return {"object": "list", "data": data, "model": model_name, "usage": dict(_USAGE)}


def _encoded(embedding: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(embedding.astype("<f4", copy=False).tobytes()).decode("ascii")
    return embedding.tolist()
