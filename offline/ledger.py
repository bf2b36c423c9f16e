"""What OUT_DIR holds, in a few bytes per row: which ids are done, and which rows `finish` keeps.

A job of 10^8 images cannot hold its ids as Python strings on the driver
(200-300 bytes each). The ledger reads the parts one at a time and keeps per
row, in part and row order, only a 128-bit digest of the id (BLAKE2b) and
three flags: about 20 bytes a row, in numpy arrays. Two different ids share
a digest with probability about n^2 / 2^129 (10^-22 at 10^8 rows), so
digests stand in for ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

DIGEST = np.dtype("S16")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
INTERNAL = "INTERNAL"  # a forward pass that failed: not the image's fault, tried again by every run


def digests(ids: Iterable[str]) -> np.ndarray:
    """The digest of each id, in order."""
    joined = b"".join(hashlib.blake2b(i.encode("utf-8"), digest_size=16).digest() for i in ids)
    return np.frombuffer(joined, dtype=DIGEST)


class DigestSet:
    """A set of ids as sorted digests: 16 bytes an id, picklable, zero-copy in Ray's object store."""

    def __init__(self, sorted_digests: np.ndarray) -> None:
        self.sorted = sorted_digests

    @classmethod
    def of(cls, ids: Iterable[str]) -> DigestSet:
        return cls(np.unique(digests(ids)))

    def __len__(self) -> int:
        return len(self.sorted)

    def __contains__(self, image_id: object) -> bool:
        return bool(self.holds(digests([str(image_id)]))[0])

    def holds(self, wanted: np.ndarray) -> np.ndarray:
        """For each digest in `wanted`, whether the set has it."""
        if not len(self.sorted):
            return np.zeros(len(wanted), bool)
        at = np.minimum(np.searchsorted(self.sorted, wanted), len(self.sorted) - 1)
        return self.sorted[at] == wanted

    def holds_ids(self, ids: Sequence[str]) -> np.ndarray:
        return self.holds(digests(ids))


@dataclass(frozen=True)
class Keep:
    """Which rows of each part `finish` keeps (one per id: a success before a failure, else the first)."""

    masks: dict[int, np.ndarray]  # part index -> bool per row, only for parts that lose rows
    rows: int  # ids kept
    failed: int  # ids whose kept row is a failure
    removed: int  # rows dropped as repeats


class Ledger:
    """Per row of every part, in part and row order: digest, succeeded, retried by every run, in an archive."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self._digests: list[np.ndarray] = []
        self._ok: list[np.ndarray] = []
        self._retry: list[np.ndarray] = []
        self._archived: list[np.ndarray] = []

    def add(self, part: str, table: pa.Table) -> None:
        """One part's `id` and `error_code` columns."""
        codes = table.column("error_code").to_numpy(zero_copy_only=False)
        self.parts.append(part)
        self._digests.append(digests(table.column("id").to_numpy(zero_copy_only=False)))
        self._ok.append(np.array([c is None for c in codes], bool))
        self._retry.append(np.array([c == INTERNAL for c in codes], bool))
        ids = table.column("id").to_pylist()
        self._archived.append(np.array([_in_archive(i) for i in ids], bool))

    def __len__(self) -> int:
        return sum(len(d) for d in self._digests)

    def failing_parts(self) -> list[int]:
        """Indices of the parts that hold a failed row."""
        return [i for i, ok in enumerate(self._ok) if not ok.all()]

    def done(self, retry_failed: bool, archived_only: bool = False) -> DigestSet:
        """Ids a run skips: those with a success, and (unless `retry_failed`) a failure a rerun would repeat.

        `archived_only`: only archive members (what the decode tasks need).
        """
        if not self._digests:
            return DigestSet(np.empty(0, DIGEST))
        skip = np.concatenate(self._ok) | ~(np.concatenate(self._retry) | retry_failed)
        if archived_only:
            skip &= np.concatenate(self._archived)
        return DigestSet(np.unique(np.concatenate(self._digests)[skip]))

    def keep(self) -> Keep:
        """One row per id: the first success, else the first failure (parts in order, rows in order)."""
        if not self._digests:
            return Keep({}, 0, 0, 0)
        digest = np.concatenate(self._digests)
        ok = np.concatenate(self._ok)
        order = np.lexsort((~ok, digest))  # stable: within an id, successes first, then in part and row order
        first = np.ones(len(order), bool)
        first[1:] = digest[order][1:] != digest[order][:-1]
        kept = np.zeros(len(order), bool)
        kept[order[first]] = True
        masks: dict[int, np.ndarray] = {}
        start = 0
        for index, rows in enumerate(self._digests):
            mask = kept[start : start + len(rows)]
            if not mask.all():
                masks[index] = mask.copy()
            start += len(rows)
        rows = int(first.sum())
        return Keep(masks, rows, int((kept & ~ok).sum()), len(order) - rows)


def _in_archive(image_id: str) -> bool:
    lowered = image_id.lower()
    return any(f"{suffix}/" in lowered for suffix in ARCHIVE_SUFFIXES)
