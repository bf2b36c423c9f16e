"""What a decode pool thread decodes through (`ChunkDecoder`), and the one that decodes on the thread itself.

`server.decode.worker.ProcessDecoder` is the other kind: a child process per pool thread.
"""

from __future__ import annotations

import collections
import logging
import traceback
from collections.abc import Callable
from typing import Protocol

import numpy as np

from server.errors import EmbedError, Internal, detached

log = logging.getLogger(__name__)

Decoded = np.ndarray | EmbedError
"""One image's decode result: uint8 pixels, or the (detached) error that refused it."""


def decode_safely(decode_one: Callable[[bytes], np.ndarray], data: bytes) -> tuple[Decoded, str | None]:
    """One image's result; a failure of any kind stays this image's, never the call's.

    An unexpected failure also returns its traceback, for the caller to log
    (a decode worker process sends it to the server, which logs it).
    """
    try:
        return decode_one(data), None
    except EmbedError as exc:
        return detached(exc), None
    except Exception:
        return Internal("internal error while decoding this image"), traceback.format_exc(limit=8)


class ChunkDecoder(Protocol):
    """Decodes chunks of images for one pool thread; every failure stays its image's result.

    Up to `depth` chunks are sent before the first one's results are received.
    """

    depth: int

    def send(self, images: list[bytes]) -> None: ...

    def receive(self) -> list[Decoded]:
        """The results of the oldest chunk sent, in order."""
        ...

    def close(self) -> None: ...


class ThreadDecoder:
    """Decodes on the calling pool thread (no process of its own)."""

    depth = 1

    def __init__(self, decode_one: Callable[[bytes], np.ndarray]) -> None:
        self._decode_one = decode_one
        self._sent: collections.deque[list[bytes]] = collections.deque()

    def send(self, images: list[bytes]) -> None:
        self._sent.append(images)

    def receive(self) -> list[Decoded]:
        results = []
        for data in self._sent.popleft():
            result, failure = decode_safely(self._decode_one, data)
            if failure is not None:
                log.error("unexpected failure while decoding an image of %d bytes:\n%s", len(data), failure)
            results.append(result)
        return results

    def close(self) -> None:
        pass
