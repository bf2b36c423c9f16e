"""The JSON job shape that the RunPod worker and the HTTP transport share: its input, its output, its codes.

    {"image": "<base64>"}          -> {"embedding": [...]}
    {"images": ["<base64>", ...]}  -> {"embeddings": [[...] or null, ...],
                                       "errors": [{"index", "code", "message"}, ...]}

plus the options, read from the JSON object by one function (`parse_options`): "pooling",
"normalize" and "patch_tokens" (true, a dtype name, or {"dtype", "normalize"}); with it, the
answer also has "patch_tokens" ({"rows", "cols", "dim", "dtype", "data": base64 of the
little-endian values}, or null for a failed image) beside "embedding(s)". An option added
there is taken by every transport that speaks this shape.
An image string is standard base64 or a data URL (`decode_base64`); an image
that fails, fails alone. Engine errors get their code names here (`CODE_OF`,
the gRPC names: one vocabulary for every transport); what a failed image
does to the whole answer is each transport's call.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pybase64

from server import errors
from server.model import Pooling
from server.service import EmbedOptions, ImageResult
from server.tokens import TOKEN_DTYPES, TokenOptions

CODE_OF: dict[type[errors.EmbedError], str] = {
    errors.InvalidImage: "INVALID_ARGUMENT",
    errors.InvalidRequest: "INVALID_ARGUMENT",
    errors.Overloaded: "RESOURCE_EXHAUSTED",
    errors.Unavailable: "UNAVAILABLE",
    errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
    errors.Cancelled: "CANCELLED",
    errors.InferenceFailed: "INTERNAL",
    errors.Internal: "INTERNAL",
}

OPTION_KEYS = ("pooling", "normalize")
TOKEN_KEYS = ("patch_tokens",)
"""Keys of the per-image outputs beyond the embedding: the JSON job takes them, OpenAI's shape has no room."""
TOKEN_OPTION_KEYS = ("dtype", "normalize")
IMAGE_KEYS = ("image", "images")
UNKNOWN_KEYS_NAMED = 3
"""Unknown keys a refusal names: a message never carries a payload back."""

ImageText = str | memoryview
"""An image's base64 text or data URL: a string, or a view of the request body that holds it (HTTP)."""
_DATA_URL_HEAD = 256
POOLINGS = {pooling.value: pooling for pooling in Pooling}


def code_of(exc: errors.EmbedError) -> str:
    return CODE_OF.get(type(exc), "INTERNAL")


@dataclass(frozen=True)
class Dialect:
    """How a transport names the parts of a job in its messages, and the keys it reads itself.

    RunPod says `input` and `job`; HTTP says `body` and `request`, and reads `timeout_ms`.
    """

    noun: str
    unit: str
    own_keys: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return (*IMAGE_KEYS, *OPTION_KEYS, *TOKEN_KEYS, *self.own_keys)


RUNPOD = Dialect("input", "job")


@dataclass(frozen=True)
class JobInput:
    """A validated job input: base64 strings, whether it used the one-image form, the options."""

    images: list[ImageText]
    single: bool
    options: EmbedOptions


def parse_input(raw: Any, max_images: int, dialect: Dialect = RUNPOD) -> JobInput:
    """Checks the whole input before any work starts; `InvalidRequest` says what is wrong.

    A key whose value is null counts as not given.
    """
    given = given_keys(raw, dialect.keys, f'{dialect.noun} must be an object with "image" or "images"', dialect.noun)
    if ("image" in given) == ("images" in given):
        raise errors.InvalidRequest(
            f'{dialect.noun} needs exactly one of "image" (a base64 string) or "images" (a list of them)'
        )
    single = "image" in given
    if single:
        images = [_base64_string(given["image"], "image")]
    else:
        images = _image_list(given["images"], max_images, dialect.unit)
    return JobInput(images, single, parse_options(given))


def given_keys(raw: Any, accepted: Sequence[str], not_object: str, noun: str) -> dict[str, Any]:
    """The keys of a JSON object whose value is not null; `InvalidRequest` for a non-object or an unknown key."""
    if not isinstance(raw, dict):
        raise errors.InvalidRequest(f"{not_object}, not {json_type(raw)}")
    unknown = [key for key in raw if key not in accepted]
    if unknown:
        named = ", ".join(shown(str(key)) for key in unknown[:UNKNOWN_KEYS_NAMED])
        more = f" and {len(unknown) - UNKNOWN_KEYS_NAMED} more" if len(unknown) > UNKNOWN_KEYS_NAMED else ""
        raise errors.InvalidRequest(f"unknown {noun} key(s) {named}{more}; accepted: {', '.join(accepted)}")
    return {key: value for key, value in raw.items() if value is not None}


def parse_options(given: Mapping[str, Any]) -> EmbedOptions:
    """The embedding options of a JSON object (missing keys take their defaults); the one place options are read."""
    pooling, normalize = _pooling(given.get("pooling", "cls")), _normalize(given.get("normalize", False))
    return EmbedOptions(pooling, normalize, _patch_tokens(given.get("patch_tokens")))


def _patch_tokens(value: Any) -> TokenOptions | None:
    """`"patch_tokens"`: false/absent (none), true (float32), a dtype name, or {"dtype", "normalize"}."""
    if value is None or value is False:
        return None
    if value is True:
        return TokenOptions()
    if isinstance(value, str) and value.lower() in TOKEN_DTYPES:
        return TokenOptions(value.lower())
    if isinstance(value, dict):
        given = given_keys(value, TOKEN_OPTION_KEYS, '"patch_tokens" must be an object', '"patch_tokens"')
        dtype = given.get("dtype", "float32")
        if not isinstance(dtype, str) or dtype.lower() not in TOKEN_DTYPES:
            said = shown(dtype) if isinstance(dtype, str) else json_type(dtype)
            raise errors.InvalidRequest(f'"patch_tokens.dtype" must be one of {", ".join(TOKEN_DTYPES)}, not {said}')
        normalize = given.get("normalize", False)
        if not isinstance(normalize, bool):
            raise errors.InvalidRequest(f'"patch_tokens.normalize" must be true or false, not {json_type(normalize)}')
        return TokenOptions(dtype.lower(), normalize)
    said = shown(value) if isinstance(value, str) else json_type(value)
    raise errors.InvalidRequest(
        f'"patch_tokens" must be true, one of {", ".join(TOKEN_DTYPES)}, or {{"dtype": ..., "normalize": ...}}, '
        f"not {said}"
    )


def _image_list(value: Any, limit: int, unit: str) -> list[ImageText]:
    if not isinstance(value, list):
        raise errors.InvalidRequest(f'"images" must be a list of base64 strings, not {json_type(value)}')
    if not value:
        raise errors.InvalidRequest('"images" is empty: send at least one image')
    if len(value) > limit:
        raise errors.InvalidRequest(f'"images" has {len(value)} items, over the limit of {limit} per {unit}')
    return [_base64_string(item, f"images[{index}]") for index, item in enumerate(value)]


def _base64_string(value: Any, where: str) -> ImageText:
    if not isinstance(value, str | memoryview):
        raise errors.InvalidRequest(f"{where} must be a base64 string, not {json_type(value)}")
    return value


def _pooling(value: Any) -> Pooling:
    if isinstance(value, str) and value.lower() in POOLINGS:
        return POOLINGS[value.lower()]
    said = shown(value) if isinstance(value, str) else json_type(value)
    raise errors.InvalidRequest(f'"pooling" must be one of {", ".join(POOLINGS)}, not {said}', "pooling")


def _normalize(value: Any) -> bool:
    if not isinstance(value, bool):
        raise errors.InvalidRequest(f'"normalize" must be true or false, not {json_type(value)}', "normalize")
    return value


def json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", memoryview: "a string",
             list: "a list", dict: "an object", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def shown(text: str, limit: int = 40) -> str:
    """Caller text quoted in a message, cut short so a message never carries a payload."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def decode_base64(text: ImageText, max_bytes: int) -> bytes:
    """Base64, or a data URL carrying it, to bytes; `InvalidImage` when it is neither or too long.

    The length is checked before decoding, so an oversize string costs nothing;
    the engine checks `max_bytes` again on the decoded bytes. Decoded by pybase64
    (SIMD): CPython's own decoder takes 0.7 ms for a 100 KB photo.
    """
    text = _data_url_payload(text)
    max_chars = 4 * math.ceil(max_bytes / 3)
    if len(text) > max_chars:
        raise errors.InvalidImage(
            f"base64 data is {len(text)} characters, over the {max_chars} that hold "
            f"the image limit of {max_bytes} bytes"
        )
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # the standard library's decoder is 60x slower and says better what is wrong
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.InvalidImage(
            f"not valid base64 ({exc}); send standard base64 without line breaks (base64 -w0)"
        ) from None


def _data_url_payload(text: ImageText) -> ImageText:
    """The base64 part of a data URL (its header is at most `_DATA_URL_HEAD` characters), or `text` itself."""
    head = text[:_DATA_URL_HEAD]
    head = head if isinstance(head, str) else head.tobytes().decode("latin-1")
    if not head.startswith("data:"):
        return text
    header, comma, _ = head.partition(",")
    if not comma or not header.endswith(";base64"):
        raise errors.InvalidImage('a data URL must look like "data:image/png;base64,<base64 data>"')
    return text[len(header) + 1 :]


Slot = bytes | ImageResult
"""One image of a job on its way to the engine: its bytes, or the answer it already has (a refusal)."""


def decode_images(texts: Sequence[ImageText], max_bytes: int) -> list[Slot]:
    """Each base64 string's bytes; one that does not decode is answered here, alone (a code and a message)."""
    slots: list[Slot] = []
    for text in texts:
        try:
            slots.append(decode_base64(text, max_bytes))
        except errors.InvalidImage as exc:
            slots.append(ImageResult(error=errors.detached(exc)))
    return slots


async def embed_slots(
    slots: Sequence[Slot], embed: Callable[[list[bytes]], Awaitable[list[ImageResult]]]
) -> list[ImageResult]:
    """The answers to every slot, in order: the images that have bytes embedded in one call of `embed`."""
    datas = images_of(slots)
    return merged(slots, await embed(datas) if datas else [])


def images_of(slots: Sequence[Slot]) -> list[bytes]:
    """The bytes of the slots that have an image to embed."""
    return [slot for slot in slots if isinstance(slot, bytes)]


def merged(slots: Sequence[Slot], embedded: Sequence[ImageResult]) -> list[ImageResult]:
    """Every slot's answer, in order: `embedded` holds those of `images_of(slots)`."""
    answers = iter(embedded)
    return [next(answers) if isinstance(slot, bytes) else slot for slot in slots]


JSON_VALUE_BYTES = 56
"""What one embedding value of a JSON answer holds while it is built: a Python float and a list slot (32 bytes),
and its text (up to 24)."""


def answer_bytes(options: EmbedOptions, embedding_dim: int, token_bytes: int) -> int:
    """The bytes one image's JSON answer holds while it is built and written, beyond what the engine counts:
    its values, and its patch tokens' base64 twice (the string, then the body)."""
    return JSON_VALUE_BYTES * options.pooling.size(embedding_dim) + 2 * 4 * math.ceil(token_bytes / 3)


def values(result: ImageResult) -> list[float] | None:
    """An image's answer as JSON: its embedding's values, or null when it failed."""
    return None if result.embedding is None else result.embedding.tolist()


def failures(results: Sequence[ImageResult]) -> list[tuple[int, errors.EmbedError]]:
    """(index, error) of every image that failed, in order."""
    return [(index, result.error) for index, result in enumerate(results) if result.error is not None]


def tokens_json(result: ImageResult) -> dict[str, Any] | None:
    """An image's patch tokens as JSON (their bytes in base64), or null when it has none."""
    tokens = result.patch_tokens
    if tokens is None:
        return None
    data = pybase64.b64encode_as_string(tokens.values)
    return {"rows": tokens.rows, "cols": tokens.cols, "dim": tokens.dim, "dtype": tokens.dtype, "data": data}


def batch_output(results: Sequence[ImageResult], options: EmbedOptions) -> dict[str, Any]:
    """The answer to an `images` job: one entry per image (null when it failed), and its errors."""
    output: dict[str, Any] = {"embeddings": [values(result) for result in results]}
    if options.patch_tokens is not None:
        output["patch_tokens"] = [tokens_json(result) for result in results]
    output["errors"] = [{"index": index, "code": code_of(exc), "message": str(exc)} for index, exc in failures(results)]
    return output


def single_output(result: ImageResult, options: EmbedOptions) -> dict[str, Any]:
    """The answer to an `image` job whose image was embedded (a failed one is the transport's to answer)."""
    output: dict[str, Any] = {"embedding": values(result)}
    if options.patch_tokens is not None:
        output["patch_tokens"] = tokens_json(result)
    return output
