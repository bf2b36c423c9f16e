"""From encoded image bytes to the model's input pixels.

The definition of an embedding's input is the reference pipeline:
`img.convert("L")`, then the model's image processor configured for grayscale
replication (`configured_processor`): with `--preprocess card` a bicubic
resize to exactly N x N (no crop), with `checkpoint` the checkpoint's own
shortest-edge resize and center crop (server/geometry.py); then replicate to
3 channels, rescale, normalize.

The service does not call the processor per image. `decode` produces the
resized (and cropped) single-channel uint8 image (PIL, the same resize the processor does),
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
from server.geometry import CARD_SIZE, PREPROCESS, Geometry, check_size, geometry_of

RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class Normalization:
    """The processor's pixel arithmetic: the square input cut out of the image (`geometry`, server/geometry.py),
    then out[c] = (x * rescale - mean[c]) / std[c]."""

    geometry: Geometry
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def image_size(self) -> int:
        """N: the model's input is N x N."""
        return self.geometry.size


def configured_processor(
    model: str,
    revision: str | None,
    local_files_only: bool = False,
    image_size: int | None = None,
    preprocess: str = "card",
):
    """The reference image processor of `--preprocess` at `--image-size`; the fast path must equal it.

    card: the model's processor overridden to resize to image_size squared
    (224 when None) with no crop; the Hub's DINOv2 processor would resize the
    shortest edge to 256 and center-crop 224. checkpoint: the model's
    processor as it is; an image_size other than its crop becomes the crop,
    and the shortest edge keeps its ratio to the crop (`Geometry.scaled`).
    The backend is pinned to Pillow: `decode` resizes with Pillow, and
    transformers 5 would otherwise pick its torchvision backend (a different
    bicubic resize) whenever torchvision is installed, so the reference would
    change with the environment.
    """
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS)}, not {preprocess!r}")
    if preprocess == "card":
        geometry = Geometry(image_size or CARD_SIZE)
        return _processor(model, revision, local_files_only, resample=RESAMPLE, **_overrides(geometry))
    processor = _processor(model, revision, local_files_only)
    if image_size is None:
        return processor
    own = geometry_of(processor)
    if own.size == image_size:
        return processor
    return _processor(model, revision, local_files_only, **_overrides(own.scaled(image_size)))


def _processor(model: str, revision: str | None, local_files_only: bool, **overrides: object):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(
            model, revision=revision, local_files_only=local_files_only, backend="pil", do_convert_rgb=True,
            **overrides,
        )  # fmt: skip
    except OSError as exc:
        raise ModelLoadError.cannot_load(model, exc) from None


def _overrides(geometry: Geometry) -> dict[str, object]:
    """The processor arguments that make it resize and crop as `geometry` says."""
    side = {"height": geometry.size, "width": geometry.size}
    if geometry.shortest_edge is None:
        return {"do_resize": True, "size": side, "do_center_crop": False}
    return {"do_resize": True, "size": {"shortest_edge": geometry.shortest_edge}, "do_center_crop": True,
            "crop_size": side}  # fmt: skip


def normalization_of(processor: object) -> Normalization:
    """Reads the pixel arithmetic out of a configured processor."""
    geometry = geometry_of(processor)
    mean = tuple(float(v) for v in processor.image_mean)  # type: ignore[attr-defined]
    std = tuple(float(v) for v in processor.image_std)  # type: ignore[attr-defined]
    if len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(f"unsupported processor config: mean={mean}, std={std}")
    rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0  # type: ignore[attr-defined]
    if not processor.do_normalize:  # type: ignore[attr-defined]
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return Normalization(geometry, rescale, mean, std)  # type: ignore[arg-type]


def model_input(
    model: str, revision: str | None, local_files_only: bool, image_size: int | None, preprocess: str, patch_size: int
) -> Normalization:
    """The served input of `--preprocess` at `--image-size`, refused (one line) unless a multiple of the patch size."""
    norm = normalization_of(configured_processor(model, revision, local_files_only, image_size, preprocess))
    if image_size is not None:
        what = f"--image-size {image_size}"
    elif preprocess == "checkpoint":
        what = f"the checkpoint's crop size {norm.image_size} (--preprocess checkpoint without --image-size)"
    else:
        what = f"the default image size {norm.image_size}"
    check_size(norm.image_size, patch_size, what)
    return norm


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
at least this many times the resize's target on each side (`Geometry.resize_side`: N for card, the
shortest edge for checkpoint); chosen by measurement (BENCHMARKS.md)."""


def decode(
    data: bytes,
    limits: ImageLimits,
    geometry: Geometry | int,
    budget: Budget | None = None,
    *,
    resize: bool = True,
    fast: bool = False,
) -> np.ndarray:
    """Encoded bytes -> grayscale uint8 pixels: resized (and cropped) to [N, N] as `geometry` says (an
    int N: card's N x N), or at full size [height, width] when not `resize` (the model runner then
    resizes them, server/resize.py).

    `fast` lets a JPEG at least twice `FAST_DRAFT_FACTOR` x the resize's
    target a side decode at a reduced DCT scale (1/2, 1/4 or 1/8, keeping no
    less than `FAST_DRAFT_FACTOR` x the target a side), straight to grayscale
    (the decoder's luma, not `convert("L")` of its RGB): not the reference's
    pixels, and much less CPU for a large photograph. Smaller JPEGs and
    other formats decode exactly. The full-size pixels (and a shortest-edge
    resize's uncropped copy) count against `budget` from before they are
    decoded until the resized copy is made (or, at full size, until they are
    handed back).
    """
    geometry = Geometry(geometry) if isinstance(geometry, int) else geometry
    img = open_image(data, limits)
    resized = _checked_resize(geometry, img.width, img.height, limits)
    side = int(FAST_DRAFT_FACTOR * geometry.resize_side)
    if fast and min(img.width, img.height) >= 2 * side:  # a smaller DCT scale exists
        with _decoding_errors(data, limits):
            img.draft("L", (side, side))  # JPEG only; other formats ignore it
    uncropped = resized[0] * resized[1] if resize and geometry.shortest_edge is not None else 0
    with budget.hold(img.width * img.height + uncropped) if budget else nullcontext():
        load_image(img, data, limits)
        gray = to_gray(img)
        del img
        if resize:
            gray = _resize_and_crop(gray, geometry)
        return np.asarray(gray, dtype=np.uint8)


def _checked_resize(geometry: Geometry, width: int, height: int, limits: ImageLimits) -> tuple[int, int]:
    """The size a shortest-edge resize makes of the image, refused when over the pixel limit.

    An extreme aspect ratio (1 x 20,000) would otherwise be resized to
    256 x 5,120,000 before its crop. Checked on the image's own size,
    whichever the placement, so both refuse the same images.
    """
    resized = geometry.resized(width, height)
    if geometry.shortest_edge is not None and resized[0] * resized[1] > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height}: its shortest edge resized to {geometry.shortest_edge} makes it "
            f"{resized[0]}x{resized[1]} = {resized[0] * resized[1]} pixels, over the limit of {limits.max_pixels}"
        )
    return resized


def _resize_and_crop(gray: Image.Image, geometry: Geometry) -> Image.Image:
    """The reference's resize (Pillow bicubic) and center crop of a grayscale image."""
    width, height = geometry.resized(gray.width, gray.height)
    gray = gray.resize((width, height), RESAMPLE)
    if (width, height) == (geometry.size, geometry.size):
        return gray
    left, top = geometry.crop_offsets(width, height)
    return gray.crop((left, top, left + geometry.size, top + geometry.size))


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
