"""The bound on full-size pixels being decoded at once, shared by every decode worker."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np


class PixelBudget:
    """Full-size pixels being decoded at once, over all decode workers; `hold` waits for room.

    A decoded image lives only while it is converted and resized, but at full
    size (4 bytes a pixel for RGB): this bound, not the number of workers,
    caps what decoding can take. An image larger than the whole budget holds
    all of it, so it waits for an empty pool rather than forever.
    """

    def __init__(self, pixels: int) -> None:
        self.capacity = pixels
        self.held = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = self.acquire(pixels)
        try:
            yield
        finally:
            self.release(pixels)

    def acquire(self, pixels: int) -> int:
        """Waits for room and holds it; returns what to `release` (capped at the capacity)."""
        pixels = min(pixels, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.held + pixels <= self.capacity)
            self.held += pixels
        return pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self.held -= pixels
            self._cond.notify_all()

    def hold_while_alive(self, images: Sequence[np.ndarray]) -> None:
        """Counts full-size decoded images against the budget until each is freed, without waiting.

        With `--resize-on device` a worker hands back its images at full size
        and the model runner resizes them. Their pixels are counted from the
        hand-back until the last reference to each is gone (after its batch is
        resized), so decodes that ask for room wait for them; the count never
        waits itself, as the images exist already and waiting here could hold
        up the decodes whose results would free room.
        """
        for image in images:
            with self._cond:
                self.held += image.size
            weakref.finalize(image, self.release, image.size)
