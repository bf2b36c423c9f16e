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
are cached per (input size, output size, device), up to 256 MB in all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import PIL
import torch

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


def coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point bicubic weights for one axis: a dense float64 [out_size, in_size] matrix of integers.

    `precompute_coeffs` then `normalize_coeffs_8bpc` of Resample.c, operation
    for operation (the box is the whole image: in0 = 0, in1 = in_size): each
    weight is multiplied by 1 / filterscale, not divided by it, and the
    weights are summed left to right (`cumsum`, not numpy's pairwise `sum`).
    """
    scale = float(np.float32(in_size)) / out_size  # (double)(in1 - in0) / outSize, in1 - in0 a float
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    weights = _bicubic(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(used, weights, 0.0)
    total = np.cumsum(weights, axis=1)[:, -1:]
    weights = np.where(total != 0.0, weights / np.where(total != 0.0, total, 1.0), weights)
    fixed = np.where(weights < 0, np.trunc(-0.5 + weights * _ONE), np.trunc(0.5 + weights * _ONE))
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows, cols = np.nonzero(used)
    matrix[rows, xmin[rows] + taps[cols]] = fixed[rows, cols]
    return matrix


class _MatrixCache:
    """The most recently used coefficient matrices, bounded in bytes: a stream of photographs of
    ever new sizes must not fill the device's memory with matrices."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._matrices: OrderedDict[tuple[int, int, torch.device], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
        key = (in_size, out_size, device)
        with self._lock:
            if key in self._matrices:
                self._matrices.move_to_end(key)
                return self._matrices[key]
        matrix = torch.from_numpy(coefficients(in_size, out_size)).to(device)
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


def _matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    return _matrices.get(in_size, out_size, device)


def _clip(acc: torch.Tensor) -> torch.Tensor:
    """`clip8`: (acc + 2^21) >> 22 clipped to 0..255; exact in float64 (a power-of-two division, then floor)."""
    return torch.floor((acc + _HALF) / _ONE).clamp_(0, 255)


def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [..., H, W] -> uint8 [..., out_h, out_w], `size` = (out_w, out_h) as Pillow takes it.

    Equal, pixel for pixel, to `Image.fromarray(image).resize(size, BICUBIC)`
    for each [H, W] image, under the installed Pillow.
    """
    in_h, in_w = pixels.shape[-2:]
    out_w, out_h = size
    if (in_w, in_h) == (out_w, out_h):
        return pixels.clone()
    x = pixels.to(torch.float64)
    horizontal = in_w != out_w
    vertical = in_h != out_h
    if vertical and vertical_first((in_w, in_h), size):
        x = _clip(_matrix(in_h, out_h, pixels.device) @ x)
        vertical = False
    if horizontal:
        x = _clip(x @ _matrix(in_w, out_w, pixels.device).T)
    if vertical:
        x = _clip(_matrix(in_h, out_h, pixels.device) @ x)
    return x.to(torch.uint8)


def resize_batch(images: Sequence[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """uint8 [H, W] images of any sizes -> uint8 [B, size, size] on `device`, each resized as Pillow would.

    Images of one size are copied and resized together (one pair of matrix
    products); those already at `size` are copied as they are.
    """
    out = torch.empty((len(images), size, size), dtype=torch.uint8, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    for (height, width), indices in by_shape.items():
        group = torch.from_numpy(np.stack([images[i] for i in indices])).to(device)
        rows = torch.tensor(indices, device=device)
        out[rows] = group if (height, width) == (size, size) else resize(group, (size, size))
    return out
