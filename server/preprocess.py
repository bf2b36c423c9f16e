"""From encoded image bytes to the model's input pixels.

The definition of an embedding's input is the reference pipeline:
`img.convert("L")`, then the model's image processor configured for grayscale
replication (`configured_processor`): resize to exactly image_size x
image_size (bicubic, no crop), replicate to 3 channels, rescale, normalize.

The service does not call the processor per image. `decode` produces the
resized single-channel uint8 image (PIL, the same resize the processor does),
or the full-size one for the model runner to resize on its device with the
same arithmetic (`--resize-on device`, server/resize.py), and `Normalization`
holds the processor's rescale/mean/std so the model runner can replicate and
normalize a whole batch at once on the device. The paths are compared in
tests/test_model.py and tests/test_fastpath.py.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.errors import InvalidImage, ModelLoadError

RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class Normalization:
    """The processor's pixel arithmetic: out[c] = (x * rescale - mean[c]) / std[c]."""

    image_size: int
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def configured_processor(model: str, revision: str | None, local_files_only: bool = False, image_size: int = 224):
    """The model's image processor, overridden to resize to image_size squared with no crop.

    This is the reference the fast path must equal; the Hub's DINOv2 processor
    would resize the shortest edge to 256 and center-crop 224. Its backend is
    pinned to Pillow: `decode` resizes with Pillow, and transformers 5 would
    otherwise pick its torchvision backend (a different bicubic resize)
    whenever torchvision is installed, so the reference would change with
    the environment.
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(
            model,
            revision=revision,
            local_files_only=local_files_only,
            backend="pil",
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            do_resize=True,
            resample=RESAMPLE,
            do_convert_rgb=True,
        )
    except OSError as exc:
        raise ModelLoadError.cannot_load(model, exc) from None


def normalization_of(processor: object) -> Normalization:
    """Reads the pixel arithmetic out of a configured processor."""
    size = processor.size  # type: ignore[attr-defined]
    mean = tuple(float(v) for v in processor.image_mean)  # type: ignore[attr-defined]
    std = tuple(float(v) for v in processor.image_std)  # type: ignore[attr-defined]
    if size["height"] != size["width"] or len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(f"unsupported processor config: size={size}, mean={mean}, std={std}")
    rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0  # type: ignore[attr-defined]
    if not processor.do_normalize:  # type: ignore[attr-defined]
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Normalization(int(size["height"]), rescale, mean, std)  # type: ignore[arg-type]


_guarded_pixels = 0
_guard_lock = threading.Lock()


def guard_pillow(max_pixels: int) -> None:
    """Keeps Pillow's own decompression-bomb guard as a second line at our limit.

    Pillow checks every image it opens, also one nested in a container (the
    PNG inside an ICO, whose directory may claim another size), against the
    process-wide `Image.MAX_IMAGE_PIXELS`: it raises `DecompressionBombError`
    above twice that, and only warns above it. The value is set to half the
    largest limit configured in this process (so `--max-image-pixels` above
    Pillow's default works, and the error comes at our limit), and the warning,
    which refuses nothing, is silenced.
    """
    global _guarded_pixels
    if max_pixels <= _guarded_pixels:
        return
    with _guard_lock:
        if max_pixels > _guarded_pixels:
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels // 2
            _guarded_pixels = max_pixels


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Reads an image's header, refusing what is not an image or is too large; no pixel is decoded yet.

    The pixel limit is checked here, from the header, so a small file that
    claims a huge image costs nothing.
    """
    if not data:
        raise InvalidImage("empty image: no bytes")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    guard_pillow(limits.max_pixels)
    with _decoding_errors(data, limits):
        img = Image.open(io.BytesIO(data))
        _check_size(img, limits)
    return img


def load_image(img: Image.Image, data: bytes, limits: ImageLimits) -> None:
    """Decodes the pixels of an opened image; checks the size again (a container's frame can differ)."""
    with _decoding_errors(data, limits):
        img.load()
        _check_size(img, limits)


def _check_size(img: Image.Image, limits: ImageLimits) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )


@contextmanager
def _decoding_errors(data: bytes, limits: ImageLimits) -> Iterator[None]:
    """Turns whatever Pillow raises on bad input into an `InvalidImage` that names the problem."""
    try:
        yield
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        if (kind := img_format(data)) != "image":
            raise InvalidImage(f"corrupt or truncated {kind} image: its header cannot be read") from None
        raise InvalidImage("not a decodable image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage(f"image (or a frame inside it) is over the limit of {limits.max_pixels} pixels") from None
    except MemoryError:
        raise InvalidImage("image too large to decode") from None
    except Exception as exc:
        raise InvalidImage(f"corrupt or truncated {img_format(data)} image: {_short(exc)}") from None


def to_gray(img: Image.Image) -> Image.Image:
    """`img.convert("L")`, as the reference does, for every mode PIL can read."""
    try:
        return img.convert("L")
    except Exception as exc:
        raise InvalidImage(f"cannot convert image of mode {img.mode} to grayscale: {_short(exc)}") from None


class Budget(Protocol):
    """What `decode` needs of a budget: `server.decode.budget.PixelBudget`, or a child process's proxy of one."""

    def hold(self, pixels: int) -> AbstractContextManager[None]: ...


FAST_DRAFT_FACTOR: float = 2
"""`--decode fast` asks the JPEG decoder for the smallest DCT scale (1/2, 1/4, 1/8) that keeps the image
at least this many times the model's input size on each side; chosen by measurement (BENCHMARKS.md)."""


def decode(
    data: bytes,
    limits: ImageLimits,
    image_size: int,
    budget: Budget | None = None,
    *,
    resize: bool = True,
    fast: bool = False,
) -> np.ndarray:
    """Encoded bytes -> grayscale uint8 pixels: resized to [image_size, image_size], or at full size
    [height, width] when not `resize` (the model runner then resizes them, server/resize.py).

    `fast` lets a JPEG at least twice `FAST_DRAFT_FACTOR` x image_size a
    side decode at a reduced DCT scale (1/2, 1/4 or 1/8, keeping no less than
    `FAST_DRAFT_FACTOR` x image_size a side), straight to grayscale (the
    decoder's luma, not `convert("L")` of its RGB): not the reference's
    pixels, and much less CPU for a large photograph. Smaller JPEGs and
    other formats decode exactly. The full-size pixels
    count against `budget` from before they are decoded until the resized
    copy is made (or, at full size, until they are handed back).
    """
    img = open_image(data, limits)
    side = int(FAST_DRAFT_FACTOR * image_size)
    if fast and min(img.width, img.height) >= 2 * side:  # a smaller DCT scale exists
        with _decoding_errors(data, limits):
            img.draft("L", (side, side))  # JPEG only; other formats ignore it
    with budget.hold(img.width * img.height) if budget else nullcontext():
        load_image(img, data, limits)
        gray = to_gray(img)
        del img
        if resize:
            gray = gray.resize((image_size, image_size), RESAMPLE)
        return np.asarray(gray, dtype=np.uint8)


def img_format(data: bytes) -> str:
    """A short name of the format the bytes start with, for messages."""
    signatures = {
        b"\x89PNG": "PNG",
        b"\xff\xd8": "JPEG",
        b"GIF8": "GIF",
        b"BM": "BMP",
        b"RIFF": "WebP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
    }
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    return "image"


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
