"""What OUT_DIR holds, in a few bytes per row: which ids are done, and which rows `finish` keeps.

A job of 10^8 images cannot hold its ids as Python strings on the driver
(200-300 bytes each). The ledger reads the parts one at a time and keeps per
row, in part and row order, only a 128-bit digest of the id (BLAKE2b) and
two flags: 18 bytes a row, in numpy arrays. Two different ids share
a digest with probability about n^2 / 2^129 (10^-22 at 10^8 rows), so
digests stand in for ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    """Per row of every part, in part and row order: digest, succeeded, retried by every run."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.torn = 0  # parts found incomplete and removed while scanning
        self._digests: list[np.ndarray] = []
        self._ok: list[np.ndarray] = []
        self._retry: list[np.ndarray] = []

    def add(self, part: str, table: pa.Table) -> None:
        """One part's `id` and `error_code` columns."""
        ids, codes = table.column("id"), table.column("error_code")
        self.parts.append(part)
        self._digests.append(digests(ids.to_pylist()))
        self._ok.append(pc.is_null(codes).to_numpy(zero_copy_only=False))
        self._retry.append(pc.fill_null(pc.equal(codes, INTERNAL), False).to_numpy(zero_copy_only=False))

    def __len__(self) -> int:
        return sum(len(d) for d in self._digests)

    def failing_parts(self) -> list[int]:
        """Indices of the parts that hold a failed row."""
        return [i for i, ok in enumerate(self._ok) if not ok.all()]

    def done(self, retry_failed: bool) -> DigestSet:
        """Ids a run skips: those with a success, and (unless `retry_failed`) a failure a rerun would repeat."""
        chosen = []
        for digest, ok, retry in zip(self._digests, self._ok, self._retry, strict=True):
            chosen.append(digest[ok | ~(retry | retry_failed)])
        found = np.concatenate(chosen) if chosen else np.empty(0, DIGEST)
        found.sort()  # repeats stay: membership by binary search does not mind them
        return DigestSet(found)

    def keep(self) -> Keep:
        """One row per id: the first success, else the first failure (parts in order, rows in order).

        Most ids have one row: only the rows of ids seen more than once are ordered, so the pass
        needs about 16 bytes a row beyond the ledger.
        """
        everything = np.concatenate(self._digests) if self._digests else np.empty(0, DIGEST)
        everything.sort()
        again = everything[1:] == everything[:-1]
        repeated = DigestSet(np.unique(everything[1:][again]))
        rows = len(everything) - int(again.sum())
        del everything, again
        digest, failed, part, row = [], [], [], []
        for index, (digests_of_part, ok) in enumerate(zip(self._digests, self._ok, strict=True)):
            at = np.flatnonzero(repeated.holds(digests_of_part))
            digest.append(digests_of_part[at])
            failed.append(~ok[at])
            part.append(np.full(len(at), index, np.int32))
            row.append(at)
        masks: dict[int, np.ndarray] = {}
        if len(repeated):
            keys = [np.concatenate(a) for a in (row, part, failed, digest)]
            order = np.lexsort(keys)  # by digest, then successes first, then part and row: the kept row leads
            sorted_digest = keys[3][order]
            dropped = np.zeros(len(order), bool)
            dropped[1:] = sorted_digest[1:] == sorted_digest[:-1]
            for index, at in zip(keys[1][order][dropped], keys[0][order][dropped], strict=True):
                masks.setdefault(int(index), np.ones(len(self._digests[index]), bool))[at] = False
        removed = sum(int((~m).sum()) for m in masks.values())
        failed_kept = sum(int((~ok & masks.get(i, True)).sum()) for i, ok in enumerate(self._ok))
        return Keep(masks, rows, failed_kept, removed)
