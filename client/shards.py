"""A dataset job's state on disk, `OUT.parts/`: the manifest, committed shards, and the failures journal.

    OUT.parts/manifest.json       what the job embeds with (client/manifest.py)
    OUT.parts/shard-000001.npz    `ids` (str [n]) and `embeddings` (float32 [n, D], or patch tokens
                                  [n, rows, cols, D] in the job's dtype), one per commit
    OUT.parts/failures.jsonl      {"id", "code", "message"} per failed image, appended at each commit
    OUT.parts/lock                held (flock) by the one process writing the job

A shard is written to a temporary name, fsynced and renamed, so it exists
whole or not at all: a crash at any moment, SIGKILL included, loses only the
rows not yet committed, and those are embedded again on resume. Shards are
committed every `shard_rows` rows or `shard_bytes` bytes (32 MiB: patch tokens
are hundreds of KB an image), whichever comes first, and at least every
`max_age_s` seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import IO

import grpc
import numpy as np

from client.errors import ItemError
from client.manifest import sync_folder

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, one job per output is up to the user
    fcntl = None  # type: ignore[assignment]

_SHARD_GLOB = "shard-*.npz"
SHARD_BYTES = 32 * 2**20
_CODE_NUMBERS = {code.name: code.value[0] for code in grpc.StatusCode}


class JobLocked(RuntimeError):
    """Another process is writing this job."""


def parts_folder(out: Path) -> Path:
    """Where a job writing `out` keeps its state: `emb.parquet` -> `emb.parquet.parts/`."""
    return out.with_name(out.name + ".parts")


class JobState:
    """The `OUT.parts/` folder of one job."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest_path = folder / "manifest.json"
        self.failures_path = folder / "failures.jsonl"
        self._lock: IO[str] | None = None

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def open(self) -> None:
        """Creates the folder if needed, takes the lock, and removes what an interrupted commit left."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / "lock", "a+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if fcntl is not None:
            try:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                self._lock = None
                raise JobLocked(f"another process is writing {self.folder}") from None
        for stray in self.folder.glob("*.tmp"):
            stray.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def clear(self) -> None:
        """Removes every shard, the journal and the manifest (`--overwrite`); keeps the lock."""
        for path in self.folder.iterdir():
            if path.name != "lock":
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        sync_folder(self.folder)

    def shards(self) -> list[Path]:
        """Committed shards, oldest first."""
        return sorted(self.folder.glob(_SHARD_GLOB))

    def next_shard_number(self) -> int:
        shards = self.shards()
        return int(shards[-1].stem.split("-")[1]) + 1 if shards else 1

    def done_ids(self) -> set[str]:
        """Ids that have a committed row (O(done) memory: the price of skipping them on resume)."""
        done: set[str] = set()
        for shard in self.shards():
            done.update(read_ids(shard))
        return done

    def failures(self, done: set[str]) -> dict[str, ItemError]:
        """Images whose last attempt failed and that have no row since, with why."""
        failed: dict[str, ItemError] = {}
        if not self.failures_path.exists():
            return failed
        with open(self.failures_path, encoding="utf-8") as journal:
            for line in journal:
                try:
                    entry = json.loads(line)
                except ValueError:  # a line torn by a crash mid-append
                    continue
                code = entry.get("code")
                number = _CODE_NUMBERS.get(code, 2) if isinstance(code, str) else int(code)
                failed[entry["id"]] = ItemError(number, str(entry.get("message", "")))
        return {image_id: error for image_id, error in failed.items() if image_id not in done}


def read_ids(shard: Path) -> list[str]:
    with np.load(shard) as data:
        return data["ids"].tolist()


def read_shard(shard: Path) -> tuple[list[str], np.ndarray]:
    """A shard's ids and its rows, as committed."""
    with np.load(shard) as data:
        return data["ids"].tolist(), data["embeddings"]


def failure_line(image_id: str, error: ItemError) -> str:
    return json.dumps({"id": image_id, "code": error.code_name, "message": error.message}, ensure_ascii=False)


class ShardWriter:
    """Collects a job's results and commits them to `state` in shards of `dtype` rows (float32, or a
    patch token job's float16: stored as they came, so shards take the bytes OUT will)."""

    def __init__(
        self, state: JobState, shard_rows: int = 1024, max_age_s: float = 10.0, shard_bytes: int = SHARD_BYTES,
        dtype: str = "float32",
    ) -> None:  # fmt: skip
        self.state = state
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.max_age_s = max_age_s
        self.dtype = dtype
        self.committed_rows = 0
        self.committed_failures = 0
        self._number = state.next_shard_number()
        self._ids: list[str] = []
        self._rows: list[np.ndarray] = []
        self._bytes = 0
        self._failures: list[tuple[str, ItemError]] = []
        self._since = time.monotonic()

    @property
    def pending(self) -> int:
        return len(self._ids) + len(self._failures)

    def add(self, image_id: str, embedding: np.ndarray) -> None:
        self._ids.append(image_id)
        self._rows.append(embedding)
        self._bytes += embedding.size * np.dtype(self.dtype).itemsize

    def fail(self, image_id: str, error: ItemError) -> None:
        self._failures.append((image_id, error))

    def due(self) -> bool:
        """A shard is full, or the oldest uncommitted result has waited `max_age_s`."""
        if len(self._ids) >= self.shard_rows or self._bytes >= self.shard_bytes:
            return True
        return self.pending > 0 and time.monotonic() - self._since >= self.max_age_s

    def commit(self) -> None:
        """Writes the collected rows as one shard and the failures to the journal, durably."""
        if self._ids:
            shard = self.state.folder / f"shard-{self._number:06d}.npz"
            temporary = shard.with_name(shard.name + ".tmp")
            with open(temporary, "wb") as out:
                rows = np.stack(self._rows).astype(self.dtype, copy=False)
                np.savez(out, ids=np.array(self._ids, dtype=str), embeddings=rows)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, shard)
            sync_folder(self.state.folder)
            self._number += 1
            self.committed_rows += len(self._ids)
            self._ids, self._rows, self._bytes = [], [], 0
        if self._failures:
            with open(self.state.failures_path, "a", encoding="utf-8") as journal:
                journal.write("".join(failure_line(i, e) + "\n" for i, e in self._failures))
                journal.flush()
                os.fsync(journal.fileno())
            self.committed_failures += len(self._failures)
            self._failures = []
        self._since = time.monotonic()
