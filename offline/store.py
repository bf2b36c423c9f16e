"""OUT_DIR: the manifest and the Parquet parts, written so that a retried or killed writer is harmless.

    OUT_DIR/manifest.json                   what the rows were embedded with (offline/manifest.py)
    OUT_DIR/lock.json                       the run writing OUT_DIR now (offline/lock.py)
    OUT_DIR/data/part-<key>-<size>.parquet  id, embedding (float32 [dim], null when failed), error_code, error

OUT_DIR is a local folder (on a cluster: one every node mounts) or a URI
pyarrow opens (`s3://bucket/out`). A part is written under a temporary name
and renamed (an object store's PUT is atomic anyway), so it exists whole or
not at all: a SIGKILL at any moment loses only rows not yet renamed, and the
next run embeds those again. `<key>` hashes the part's ids, so a retried
write task with the same rows writes the same file again; `<size>` is its
length in bytes, so a part that is known to be incomplete can be told from
one that a storage error kept from being read. Nothing in OUT_DIR is removed
for any other reason but `--overwrite`. An id can still end up in two parts
(a task retried with its rows batched differently, a failure retried by
another run); `Store.finish` keeps one row per id, a success before a
failure, by rewriting the parts that hold the others (offline/ledger.py).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from offline.ledger import Keep, Ledger

MANIFEST = "manifest.json"
LOCK = "lock.json"
DATA = "data"


def part_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
        ("error_code", pa.string()),
        ("error", pa.string()),
    ])  # fmt: skip


class StoreError(OSError):
    """OUT_DIR cannot be read or written: the job stops, and keeps everything."""


@dataclass(frozen=True)
class Tally:
    """What the parts hold, one row per id once `finish` ran."""

    rows: int
    failed: int
    failures: list[tuple[str, str]]  # up to 20 (id, "CODE: message")
    duplicates_removed: int = 0
    torn_parts: int = 0


class Store:
    """One OUT_DIR. Picklable (it holds only the location): write tasks on any node get a copy."""

    def __init__(self, out: str) -> None:
        self.out = out
        self._fs: pafs.FileSystem | None = None

    def __getstate__(self) -> dict[str, str]:
        return {"out": self.out}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["out"])  # type: ignore[misc]

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            if "://" in self.out:
                self._fs, self._root = pafs.FileSystem.from_uri(self.out)
            else:
                self._fs, self._root = pafs.LocalFileSystem(), os.path.abspath(self.out)
        return self._fs

    def path(self, *names: str) -> str:
        _ = self.fs
        return "/".join([self._root.rstrip("/"), *names])

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path()).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        """Whether OUT_DIR holds nothing but, perhaps, a lock file."""
        selector = pafs.FileSelector(self.path(), allow_not_found=True)
        return all(i.path.rsplit("/", 1)[-1] == LOCK for i in self.fs.get_file_info(selector))

    # ------------------------------------------------------------------ files

    def write_atomic(self, name: str, data: bytes) -> None:
        """Writes `name` (relative to OUT_DIR) whole or not at all: a temporary file, fsynced, renamed."""
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        temporary = f"{parent}/.{final.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        if self.local:
            os.makedirs(parent, exist_ok=True)
            with open(temporary, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, final)
            return
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(final) as out:  # object stores: the PUT is the commit
            out.write(data)

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open_input_stream(self.path(name)) as stream:
                return stream.read().decode("utf-8")
        except FileNotFoundError:
            return None

    def clear(self) -> None:
        """Removes the manifest and every part (for `--overwrite`)."""
        if self.fs.get_file_info(self.path(DATA)).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path(DATA))
        if self.fs.get_file_info(self.path(MANIFEST)).type != pafs.FileType.NotFound:
            self.fs.delete_file(self.path(MANIFEST))

    def parts(self) -> list[str]:
        """Paths of the committed parts, sorted (temporary files of writers that died are not parts)."""
        return [info.path for info in self._part_infos()]

    def _part_infos(self) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path(DATA), allow_not_found=True)
        infos = [info for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        parts = [i for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")]
        return sorted(parts, key=lambda info: info.path)

    # ------------------------------------------------------------------ rows

    def write_part(self, ids: list[str], embeddings: np.ndarray, codes: list[str], errors: list[str]) -> str:
        """One part: rows of `ids`; a row whose code is not empty has no embedding. Returns its name."""
        dim = embeddings.shape[1]
        failed = np.array([bool(c) for c in codes])
        values = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).ravel())
        table = pa.table(
            [
                pa.array(ids, pa.string()),
                pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(failed)),
                pa.array([c or None for c in codes], pa.string()),
                pa.array([e or None for e in errors], pa.string()),
            ],
            schema=part_schema(dim),
        )
        return self._commit(table)

    def _commit(self, table: pa.Table) -> str:
        """Writes `table` as a part named by its ids (a retried task rewrites the same file) and its size."""
        key = hashlib.sha1("\n".join(table.column("id").to_pylist()).encode("utf-8")).hexdigest()[:20]
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        name = f"{DATA}/part-{key}-{len(data)}.parquet"
        self.write_atomic(name, data)
        return name

    def scan(self) -> Ledger:
        """Every committed part's ids and outcomes, one part in memory at a time.

        A part whose size differs from the size in its name is known to be
        incomplete: it is removed, and its images are embedded again. Any
        other failure to read a part stops the job with `StoreError`, and
        nothing is removed: a passing storage error must not cost rows.
        """
        ledger = Ledger()
        for info in self._part_infos():
            path = info.path
            if _torn(info):
                self.fs.delete_file(path)
                ledger.torn += 1
                continue
            try:
                table = pq.read_table(path, columns=["id", "error_code"], filesystem=self.fs)
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read {path}: {exc}; nothing was removed: fix the storage (or move that "
                                 "part away) and run the same command again") from None  # fmt: skip
            ledger.add(path, table)
        return ledger

    def remove_temporaries(self) -> int:
        """Removes what writers that died left under temporary names (call only while holding the lock)."""
        selector = pafs.FileSelector(self.path(DATA), allow_not_found=True)
        stray = [i.path for i in self.fs.get_file_info(selector) if i.path.endswith(".tmp")]
        for path in stray:
            self.fs.delete_file(path)
        return len(stray)

    def finish(self, ledger: Ledger) -> Tally:
        """Leaves one row per id (a success before a failure, else the first part's) and counts them."""
        keep = ledger.keep()
        failures = self._failures(ledger, keep) if keep.failed else []
        for index, mask in keep.masks.items():
            path = ledger.parts[index]
            if mask.any():
                table = pq.read_table(path, filesystem=self.fs).filter(pa.array(mask))
                self._replace(path, table)
            else:
                self.fs.delete_file(path)
        return Tally(keep.rows, keep.failed, failures, keep.removed, ledger.torn)

    def _replace(self, path: str, table: pa.Table) -> None:
        """Writes a part's kept rows under a new name, then removes the old part: a crash between keeps both."""
        self._commit(table)
        self.fs.delete_file(path)

    def _failures(self, ledger: Ledger, keep: Keep, limit: int = 20) -> list[tuple[str, str]]:
        """(id, "CODE: message") of up to `limit` images whose kept row is a failure."""
        found: list[tuple[str, str]] = []
        for index in ledger.failing_parts():
            table = pq.read_table(ledger.parts[index], columns=["id", "error_code", "error"], filesystem=self.fs)
            if index in keep.masks:
                table = table.filter(pa.array(keep.masks[index]))
            found.extend((i, f"{c}: {e}") for i, c, e in _rows(table) if c is not None)
            if len(found) >= limit:
                break
        return found[:limit]


def _torn(info: pafs.FileInfo) -> bool:
    """Whether a part's size contradicts the size its name records (names without one never do)."""
    size = info.base_name.removesuffix(".parquet").split("-")[-1]
    return size.isdigit() and len(info.base_name.split("-")) == 3 and info.size != int(size)


def _rows(table: pa.Table) -> list[tuple[str, str | None, str | None]]:
    return list(zip(*(table.column(c).to_pylist() for c in ("id", "error_code", "error")), strict=True))
