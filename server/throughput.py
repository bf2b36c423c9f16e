"""How long the engine needs for a backlog of images, from what it measured: admission's clock.

The batcher reports every forward pass (batch size, seconds) and the decode
pool every chunk (images, seconds of one worker). Admission asks how long the
images already accepted, plus a new request's, will take; it refuses a request
whose deadline that would miss (server/admission.py). Nothing here is
configured: a CPU running dinov2-base and a GPU running dinov2-small differ by
four orders of magnitude, and a busy machine changes its own speed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

_WEIGHT = 0.3  # of the newest measurement in each moving average


def _averaged(old: float | None, new: float) -> float:
    return new if old is None else old + _WEIGHT * (new - old)


class ForwardTimes:
    """Recent seconds of one forward pass, by batch size (a moving average per size seen)."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._sizes: list[int] = []  # the sizes seen, sorted

    def observe(self, size: int, seconds: float) -> None:
        if size < 1 or seconds < 0:
            return
        if size not in self._seconds:
            bisect.insort(self._sizes, size)
        self._seconds[size] = _averaged(self._seconds.get(size), seconds)

    def batch_seconds(self, size: int) -> float | None:
        """One pass of `size` images; None before any pass was measured.

        An unseen size is scaled from the largest smaller size seen (per-image
        cost falls with batch size, so this errs long), else taken as long as
        the smallest larger size seen.
        """
        if size in self._seconds:
            return self._seconds[size]
        if not self._sizes:
            return None
        below = bisect.bisect_left(self._sizes, size)
        if below > 0:
            smaller = self._sizes[below - 1]
            return self._seconds[smaller] * size / smaller
        return self._seconds[self._sizes[0]]

    def seconds_for(self, images: int, batch_limit: int) -> float | None:
        """`images` run as full batches of `batch_limit` and one partial batch."""
        full, rest = divmod(images, batch_limit)
        per_full = self.batch_seconds(batch_limit) if full else 0.0
        per_rest = self.batch_seconds(rest) if rest else 0.0
        if per_full is None or per_rest is None:
            return None
        return full * per_full + per_rest


class DecodeTimes:
    """Recent seconds one decode worker spends per image (a moving average over chunks)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.per_image: float | None = None

    def observe(self, images: int, seconds: float) -> None:
        if images > 0 and seconds >= 0:
            self.per_image = _averaged(self.per_image, seconds / images)

    def seconds_for(self, images: int) -> float:
        """`images` decoded by all workers at once (0 before any chunk was measured)."""
        return (self.per_image or 0.0) * images / self.workers


@dataclass(frozen=True)
class Estimate:
    """How long until a request is answered (the slower of the forward passes and decoding, which
    overlap), and how much of that is its own work: the rest is waiting behind the work ahead."""

    images: int
    seconds: float
    own_seconds: float = 0.0

    @property
    def wait(self) -> float:
        return max(0.0, self.seconds - self.own_seconds)

    @property
    def rate(self) -> float:
        """Images per second at this estimate (0 when it takes no time)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


class Throughput:
    """The engine's measured speed; `estimate` answers how long a backlog will take."""

    def __init__(self, forward: ForwardTimes, decode: DecodeTimes) -> None:
        self.forward = forward
        self.decode = decode

    def estimate(
        self, ahead: int, own: int, decoding: int, callers: int, batch_limit: int, taken: int | None = None
    ) -> Estimate | None:
        """How long until a request of `own` images is answered, behind `ahead` images already accepted
        (`decoding` of them still to decode, for `callers` callers, `taken` of those by a worker
        already: all of them by default); with `own` 0, the backlog itself.

        The decoders take turns between callers in slices of equal time, so a request's images wait
        for at most as much of each other caller's decoding as they cost themselves. The batch queue
        is first come, first served: the images ahead that are decoded or being decoded, and those
        decoded before the request's, run before it. None until a forward pass has been measured
        (the service times one as it starts).
        """
        decoded_first = min(decoding, own * callers) if own else decoding
        queued = 0 if taken is None else decoding - taken
        forward = self.forward.seconds_for(ahead - queued + min(queued, decoded_first) + own, batch_limit)
        alone = self.forward.seconds_for(own, batch_limit)
        if forward is None or alone is None:
            return None
        seconds = max(forward, self.decode.seconds_for(decoded_first + own))
        return Estimate(ahead + own, seconds, max(alone, self.decode.seconds_for(own)))
