"""OUT_DIR: the manifest and the Parquet parts, written so that a retried or killed writer is harmless.

    OUT_DIR/manifest.json             what the rows were embedded with (offline/manifest.py)
    OUT_DIR/data/part-<key>.parquet   id, embedding (float32 [dim], null when failed), error_code, error

OUT_DIR is a local folder (on a cluster: one every node mounts) or a URI
pyarrow opens (`s3://bucket/out`). A part is written under a temporary name
and renamed (an object store's PUT is atomic anyway), so it exists whole or
not at all: a SIGKILL at any moment loses only rows not yet renamed, and the
next run embeds those again. `<key>` hashes the part's ids, so a retried
write task with the same rows writes the same file again. An id can still
end up in two parts (a task retried with its rows batched differently, a
failure retried by another run); `Store.finish` keeps one row per id, a
success before a failure, by rewriting the parts that hold the others.
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

MANIFEST = "manifest.json"
DATA = "data"


def part_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
        ("error_code", pa.string()),
        ("error", pa.string()),
    ])  # fmt: skip


@dataclass(frozen=True)
class Tally:
    """What the parts hold, one row per id once `finish` ran."""

    rows: int
    failed: dict[str, str]  # id -> "CODE: message"
    duplicates_removed: int = 0
    unreadable_parts: int = 0


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
        selector = pafs.FileSelector(self.path(), allow_not_found=True)
        return not self.fs.get_file_info(selector)

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
        selector = pafs.FileSelector(self.path(DATA), allow_not_found=True)
        names = [info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(p for p in names if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))

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
        key = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()[:20]
        name = f"{DATA}/part-{key}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_atomic(name, sink.getvalue().to_pybytes())
        return name

    def read_ids(self, columns: tuple[str, ...] = ("id", "error_code")) -> tuple[dict[str, pa.Table], int]:
        """Each readable part's `columns`; a part that cannot be read (a torn write on a dead disk) is removed."""
        tables: dict[str, pa.Table] = {}
        unreadable = 0
        for path in self.parts():
            try:
                tables[path] = pq.read_table(path, columns=list(columns), filesystem=self.fs)
            except (OSError, pa.ArrowException):
                self.fs.delete_file(path)
                unreadable += 1
        return tables, unreadable

    def done_ids(self) -> set[str]:
        """Ids that have a row, a failure included (a rerun does not try them again)."""
        tables, _ = self.read_ids(("id",))
        return {i for table in tables.values() for i in table.column("id").to_pylist()}

    def finish(self) -> Tally:
        """Leaves one row per id (a success before a failure, else the first part's) and counts them."""
        tables, unreadable = self.read_ids(("id", "error_code", "error"))
        rows = {path: _rows(table) for path, table in tables.items()}
        keeper: dict[str, tuple[str, bool]] = {}  # id -> (part, succeeded)
        for path, part in rows.items():
            for image_id, code, _ in part:
                held = keeper.get(image_id)
                if held is None or (code is None and not held[1]):
                    keeper[image_id] = (path, code is None)
        removed = 0
        for path, part in rows.items():
            seen: set[str] = set()  # an id twice in one part (written twice in one batch) is kept once
            keep = []
            for image_id, code, _ in part:
                kept = keeper[image_id] == (path, code is None) and image_id not in seen
                keep.append(kept)
                if kept:
                    seen.add(image_id)
            if all(keep):
                continue
            removed += keep.count(False)
            if any(keep):
                sink = pa.BufferOutputStream()
                pq.write_table(pq.read_table(path, filesystem=self.fs).filter(pa.array(keep)), sink)
                self.write_atomic(path[len(self.path()) + 1 :], sink.getvalue().to_pybytes())
            else:
                self.fs.delete_file(path)
        failed = {
            image_id: f"{code}: {error}"
            for part in rows.values()
            for image_id, code, error in part
            if code is not None and not keeper[image_id][1]
        }
        return Tally(len(keeper), failed, removed, unreadable)


def _rows(table: pa.Table) -> list[tuple[str, str | None, str | None]]:
    return list(zip(*(table.column(c).to_pylist() for c in ("id", "error_code", "error")), strict=True))
