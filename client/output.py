"""Writers for embeddings and their ids: .npy (+ ids sidecar), .npz, .parquet, or JSON lines.

Rows are written as they arrive, so a job over millions of images does not
hold every embedding in memory. Files are written under a temporary name and
renamed when complete: an interrupted job leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import IO, Protocol

import numpy as np

SUFFIXES = (".npy", ".npz", ".parquet")
_NPY_HEADER_BYTES = 128  # fixed, so the shape can be filled in at the end; a multiple of 64 as .npy wants


class Writer(Protocol):
    """Receives rows in order; `close()` makes the output final, `abort()` removes it."""

    def add(self, ids: list[str], rows: np.ndarray) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def ids_path(out: Path) -> Path:
    """The ids sidecar of a .npy file: `emb.npy` -> `emb.ids.txt`."""
    return out.with_suffix(".ids.txt")


def open_writer(out: Path | None, stdout: IO[str], dim: int = 0) -> Writer:
    """The writer for an output path (by suffix), or JSON lines on stdout when there is none.

    `dim` is the row size an output without rows still declares: [0, dim].
    """
    if out is None:
        return JsonLinesWriter(stdout)
    suffix = out.suffix.lower()
    if suffix == ".npy":
        return NpyWriter(out, ids_path(out), dim)
    if suffix == ".npz":
        return NpzWriter(out, dim)
    if suffix == ".parquet":
        return ParquetWriter(out, dim)
    raise ValueError(f"cannot write {out.name!r}: the output must end in {', '.join(SUFFIXES)}")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _npy_header(rows: int, dim: int) -> bytes:
    """A version 1.0 .npy header for float32 [rows, dim], padded to `_NPY_HEADER_BYTES`."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}".encode("latin1")
    body = _NPY_HEADER_BYTES - 10  # magic (6) + version (2) + length (2)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + text + b" " * (body - len(text) - 1) + b"\n"


class NpyWriter:
    """float32 [N, D] .npy written row by row (header rewritten at the end); ids one per line beside it."""

    def __init__(self, out: Path, ids_out: Path | None, dim: int = 0) -> None:
        self.out, self.ids_out = out, ids_out
        self.rows, self.dim = 0, dim
        self._data = open(_partial(out), "wb")  # noqa: SIM115 - closed in close()/abort()
        self._data.write(_npy_header(0, dim))
        self._ids = open(_partial(ids_out), "w", encoding="utf-8", newline="\n") if ids_out else None  # noqa: SIM115

    def add(self, ids: list[str], rows: np.ndarray) -> None:
        if not ids:
            return
        if self.rows and rows.shape[1] != self.dim:
            raise ValueError(f"embedding size changed from {self.dim} to {rows.shape[1]}")
        self.dim = rows.shape[1]
        self._data.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self.rows += len(ids)
        if self._ids is not None:
            for image_id in ids:
                if "\n" in image_id or "\r" in image_id:
                    raise ValueError(f"id {image_id!r} has a line break; write .npz or .parquet instead")
                self._ids.write(image_id + "\n")

    def close(self) -> None:
        self._data.seek(0)
        self._data.write(_npy_header(self.rows, self.dim))
        self._data.close()
        os.replace(_partial(self.out), self.out)
        if self._ids is not None and self.ids_out is not None:
            self._ids.close()
            os.replace(_partial(self.ids_out), self.ids_out)

    def abort(self) -> None:
        self._data.close()
        _partial(self.out).unlink(missing_ok=True)
        if self._ids is not None and self.ids_out is not None:
            self._ids.close()
            _partial(self.ids_out).unlink(missing_ok=True)


class NpzWriter:
    """`.npz` with `embeddings` (float32 [N, D]) and `ids` (unicode [N]); rows stream to a temporary .npy."""

    def __init__(self, out: Path, dim: int = 0) -> None:
        self.out = out
        self._rows = NpyWriter(out.with_name(out.name + ".rows.npy"), None, dim)
        self._ids: list[str] = []

    def add(self, ids: list[str], rows: np.ndarray) -> None:
        self._rows.add(ids, rows)
        self._ids.extend(ids)

    def close(self) -> None:
        self._rows.close()
        try:
            with zipfile.ZipFile(_partial(self.out), "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                archive.write(self._rows.out, "embeddings.npy")
                with archive.open("ids.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.array(self._ids, dtype=str))
            os.replace(_partial(self.out), self.out)
        finally:
            self._rows.out.unlink(missing_ok=True)

    def abort(self) -> None:
        self._rows.abort()
        _partial(self.out).unlink(missing_ok=True)


class ParquetWriter:
    """Parquet with columns `id` (string) and `embedding` (fixed-size list of float32); needs pyarrow."""

    def __init__(self, out: Path, dim: int = 0) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("writing .parquet needs pyarrow (pip install pyarrow); or write .npy or .npz") from None
        self.out = out
        self.dim = dim
        self._writer = None

    def add(self, ids: list[str], rows: np.ndarray) -> None:
        if not ids:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
        table = pa.table({"id": pa.array(ids, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(values, rows.shape[1])})  # fmt: skip
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(_partial(self.out)), table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:  # no rows: an empty file with the schema
            schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), self.dim))])
            pq.write_table(schema.empty_table(), str(_partial(self.out)))
        else:
            self._writer.close()
        os.replace(_partial(self.out), self.out)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        _partial(self.out).unlink(missing_ok=True)


class JsonLinesWriter:
    """One `{"id": ..., "embedding": [...]}` object per line, for pipes and small jobs."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def add(self, ids: list[str], rows: np.ndarray) -> None:
        for image_id, row in zip(ids, rows, strict=True):
            self._stream.write(json.dumps({"id": image_id, "embedding": row.tolist()}) + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()

    def abort(self) -> None:
        self._stream.flush()
