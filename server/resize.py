"""Pillow's 8-bit bicubic resize, bit for bit, as float64 matrix products on any PyTorch device.

`Image.resize(size, BICUBIC)` on an "L" image (Pillow's src/libImaging/Resample.c)
is integer arithmetic: for each output column (then row) the filter weights
are computed in double, normalized to sum 1 and fixed to 22 bits
(`PRECISION_BITS`, rounded half away from zero); each output pixel is
(sum of input pixels x weights + 2^21) >> 22, clipped to 0..255, and the
second pass reads the clipped uint8 result of the first. Written as one
[out, in] matrix of those integers per axis, each pass is a float64 matrix
product whose every partial sum is an integer below 2^53, so it is exact in
any order of summation (BLAS, cuBLAS): the result equals Pillow's.

Which axis goes first depends on the Pillow release (`vertical_first`); a
pass whose axis keeps its size is skipped, as Pillow skips it. The matrices
are cached per (input size, output size, rows kept, device), up to 256 MB in all. A center
crop (`--preprocess checkpoint`) keeps only the crop's rows of each matrix.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import PIL
import torch

from server.geometry import Geometry

PRECISION_BITS = 22
_HALF = float(1 << (PRECISION_BITS - 1))
_ONE = float(1 << PRECISION_BITS)
_SUPPORT = 2.0  # bicubic
_CACHE_BYTES = 256 << 20  # coefficient matrices kept per process (a 6000-pixel side to 224 is 10.8 MB)


def pillow_major(version: str = PIL.__version__) -> int:
    return int(version.split(".")[0])


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int], major: int | None = None) -> bool:
    """Whether Pillow `major` (the installed one by default) resizes the rows' axis first.

    Up to Pillow 12 the horizontal pass always comes first. From Pillow 13
    (python-pillow/Pillow#9549) the vertical pass goes first when it shrinks
    the height, and by more than twice what the horizontal one takes off the
    width: in_h > out_h and (in_h - out_h) > 2 x (in_w - out_w) (measured
    against Pillow 13.0 on 3,000 random shapes; tests/test_resize.py). The
    order changes the result: the first pass is clipped to uint8.
    """
    major = pillow_major() if major is None else major
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    return major >= 13 and in_h > out_h and (in_h - out_h) > 2 * (in_w - out_w)


def placement(resize_on: str, device: torch.device) -> str:
    """`--resize-on` resolved for the model's device: auto is the device on CUDA, and the decode
    workers on a CPU, where the device resize would only move CPU work onto the compute thread."""
    if resize_on != "auto":
        return resize_on
    return "device" if device.type == "cuda" else "workers"


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Resample.c's `bicubic_filter` (a = -0.5), elementwise, with its operations in its order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def coefficients(in_size: int, out_size: int, first: int = 0, count: int | None = None) -> np.ndarray:
    """Pillow's fixed-point bicubic weights for one axis: a dense float64 [count, in_size] matrix of integers,
    rows `first` to `first + count` (all out_size by default) of the resize to out_size.

    `precompute_coeffs` then `normalize_coeffs_8bpc` of Resample.c, operation
    for operation (the box is the whole image: in0 = 0, in1 = in_size): each
    weight is multiplied by 1 / filterscale, not divided by it, and the
    weights are summed left to right (`cumsum`, not numpy's pairwise `sum`).
    Each output pixel has its own row, so a crop of the output is a slice of rows.
    """
    count = out_size - first if count is None else count
    scale = float(np.float32(in_size)) / out_size  # (double)(in1 - in0) / outSize, in1 - in0 a float
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(first, first + count) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    weights = _bicubic(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(used, weights, 0.0)
    total = np.cumsum(weights, axis=1)[:, -1:]
    weights = np.where(total != 0.0, weights / np.where(total != 0.0, total, 1.0), weights)
    fixed = np.where(weights < 0, np.trunc(-0.5 + weights * _ONE), np.trunc(0.5 + weights * _ONE))
    matrix = np.zeros((count, in_size), dtype=np.float64)
    rows, cols = np.nonzero(used)
    matrix[rows, xmin[rows] + taps[cols]] = fixed[rows, cols]
    return matrix


class _MatrixCache:
    """The most recently used coefficient matrices, bounded in bytes: a stream of photographs of
    ever new sizes must not fill the device's memory with matrices."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._matrices: OrderedDict[tuple[int, int, int, int, torch.device], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, in_size: int, out_size: int, device: torch.device, first: int = 0, count: int | None = None
            ) -> torch.Tensor:  # fmt: skip
        count = out_size - first if count is None else count
        key = (in_size, out_size, first, count, device)
        with self._lock:
            if key in self._matrices:
                self._matrices.move_to_end(key)
                return self._matrices[key]
        matrix = torch.from_numpy(coefficients(in_size, out_size, first, count)).to(device)
        size = matrix.numel() * matrix.element_size()
        with self._lock:
            if key not in self._matrices and size <= self.max_bytes:
                self._matrices[key] = matrix
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, dropped = self._matrices.popitem(last=False)
                    self.bytes -= dropped.numel() * dropped.element_size()
        return matrix


_matrices = _MatrixCache(_CACHE_BYTES)


def _matrix(in_size: int, out_size: int, device: torch.device, first: int, count: int) -> torch.Tensor:
    return _matrices.get(in_size, out_size, device, first, count)


def _clip(acc: torch.Tensor) -> torch.Tensor:
    """`clip8`: (acc + 2^21) >> 22 clipped to 0..255; exact in float64 (a power-of-two division, then floor)."""
    return torch.floor((acc + _HALF) / _ONE).clamp_(0, 255)


def resize(pixels: torch.Tensor, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """uint8 [..., H, W] -> uint8 [..., out_h, out_w], `size` = (out_w, out_h) as Pillow takes it.

    Equal, pixel for pixel, to `Image.fromarray(image).resize(size, BICUBIC)`
    for each [H, W] image, under the installed Pillow. `crop` = (left, top,
    width, height) computes only that box of the output, the same pixels as
    slicing the whole result (each pass's output rows and columns are
    independent of each other; the pass order is the whole resize's).
    """
    in_h, in_w = pixels.shape[-2:]
    out_w, out_h = size
    left, top, crop_w, crop_h = crop or (0, 0, out_w, out_h)
    horizontal = in_w != out_w
    vertical = in_h != out_h
    if not horizontal:
        pixels = pixels[..., left : left + crop_w]
    if not vertical:
        pixels = pixels[..., top : top + crop_h, :]
    if not (horizontal or vertical):
        return pixels.clone()
    x = pixels.to(torch.float64)
    device = pixels.device
    if vertical and vertical_first((in_w, in_h), size):
        x = _clip(_matrix(in_h, out_h, device, top, crop_h) @ x)
        vertical = False
    if horizontal:
        x = _clip(x @ _matrix(in_w, out_w, device, left, crop_w).T)
    if vertical:
        x = _clip(_matrix(in_h, out_h, device, top, crop_h) @ x)
    return x.to(torch.uint8)


def resize_batch(images: Sequence[np.ndarray], geometry: Geometry | int, device: torch.device) -> torch.Tensor:
    """uint8 [H, W] images of any sizes -> uint8 [B, N, N] on `device`, each resized (and center-cropped)
    as the decode workers do with Pillow (`geometry`; an int N: card's N x N).

    Images of one size are copied and resized together (one pair of matrix
    products, over the crop only); those that need no resize are copied as they are.
    """
    geometry = Geometry(geometry) if isinstance(geometry, int) else geometry
    size = geometry.size
    out = torch.empty((len(images), size, size), dtype=torch.uint8, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    for (height, width), indices in by_shape.items():
        group = torch.from_numpy(np.stack([images[i] for i in indices])).to(device)
        rows = torch.tensor(indices, device=device)
        target = geometry.resized(width, height)
        if target == (width, height) == (size, size):
            out[rows] = group
        else:
            out[rows] = resize(group, target, (*geometry.crop_offsets(*target), size, size))
    return out
