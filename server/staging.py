"""Host buffers a batch is assembled in on its way to the device.

On a CUDA device the buffers are pinned (page-locked), so the host-to-device
copy is a DMA the CPU only enqueues (`non_blocking=True`): the compute thread
goes on to enqueue the forward pass while the copy engine moves the pixels.
A buffer may be refilled only once its copy has finished, so there are two,
used in turn, each with the CUDA event recorded after its copy: filling one
waits only for the copy issued from it two batches ago.

On the CPU the same code runs without pinning or events; the "copy" to the
device is then the buffer itself (`Tensor.to` returns it), which is safe
because the forward pass that reads it ends before the buffer is used again.

Pixels travel as uint8 (a quarter of float32's bytes); the conversion to
float happens on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class Staging:
    """`to_device(images)`: uint8 [B, S, S] (an array, or a sequence of [S, S] arrays) -> a device tensor."""

    def __init__(self, device: torch.device, image_size: int, slots: int = 2) -> None:
        self.device = device
        self.image_size = image_size
        self.pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._copied: list[torch.cuda.Event | None] = [None] * slots
        self._turn = 0

    def to_device(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """Fills the next buffer with the batch and starts its copy to the device (not waiting for it)."""
        count = len(images)
        slot = self._turn
        self._turn = (self._turn + 1) % len(self._buffers)
        copied = self._copied[slot]
        if copied is not None:
            copied.synchronize()  # the copy issued from this buffer two batches ago
        host = self._buffer(slot, count)[:count]
        target = host.numpy()
        if isinstance(images, np.ndarray):
            np.copyto(target, images, casting="no")
        else:
            np.stack(images, out=target, casting="no")
        on_device = host.to(self.device, non_blocking=True)
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self._copied[slot] = event
        return on_device

    def _buffer(self, slot: int, count: int) -> torch.Tensor:
        """The slot's buffer, grown (never shrunk) to hold `count` images."""
        buffer = self._buffers[slot]
        if buffer is None or buffer.shape[0] < count:
            size = self.image_size
            buffer = torch.empty((count, size, size), dtype=torch.uint8, pin_memory=self.pinned)
            self._buffers[slot] = buffer
        return buffer
