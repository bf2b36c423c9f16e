"""Writers for embeddings or patch tokens and their ids: .npy (+ ids sidecar), .npz, .parquet, or JSON lines.

Rows are written as they arrive, so a job over millions of images does not
hold every embedding in memory. Files are written under a temporary name and
renamed when complete: an interrupted job leaves no half-written output.
A row is what `Layout` says: a pooled embedding, float32 [D], or one image's
patch tokens [rows, cols, D] in float32 or float16 (.npy and .parquet only).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np

SUFFIXES = (".npy", ".npz", ".parquet")
TOKEN_SUFFIXES = (".npy", ".parquet")
_NPY_HEADER_BYTES = 128  # fixed, so the shape can be filled in at the end; a multiple of 64 as .npy wants


@dataclass(frozen=True)
class Layout:
    """What one row of an output holds: its shape ((D,) pooled, (rows, cols, D) patch tokens) and dtype.

    A size of 0 is not known yet (a RunPod job learns D from its first row).
    """

    shape: tuple[int, ...] = (0,)
    dtype: str = "float32"

    @property
    def tokens(self) -> bool:
        return len(self.shape) == 3

    @property
    def row_bytes(self) -> int:
        """Bytes of one row; 0 while its size is not known."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def describe(self) -> str:
        """`dim 384`, or `patch tokens 16x16x384 float16`, for the job's messages."""
        if self.tokens:
            return f"patch tokens {'x'.join(map(str, self.shape))} {self.dtype}"
        return f"dim {self.shape[-1]}"


class Writer(Protocol):
    """Receives rows in order; `close()` makes the output final, `abort()` removes it."""

    def add(self, ids: list[str], rows: np.ndarray) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def ids_path(out: Path) -> Path:
    """The ids sidecar of a .npy file: `emb.npy` -> `emb.ids.txt`."""
    return out.with_suffix(".ids.txt")


def open_writer(out: Path | None, stdout: IO[str], layout: Layout | None = None) -> Writer:
    """The writer for an output path (by suffix), or JSON lines on stdout when there is none.

    `layout` is what a row holds; an output without rows still declares it ([0, D], [0, rows, cols, D]).
    """
    layout = layout or Layout()
    if layout.tokens and (out is None or out.suffix.lower() not in TOKEN_SUFFIXES):
        raise ValueError(tokens_refused(out))
    if out is None:
        return JsonLinesWriter(stdout)
    suffix = out.suffix.lower()
    if suffix == ".npy":
        return NpyWriter(out, ids_path(out), layout)
    if suffix == ".npz":
        return NpzWriter(out, layout)
    if suffix == ".parquet":
        return ParquetWriter(out, layout)
    raise ValueError(f"cannot write {out.name!r}: the output must end in {', '.join(SUFFIXES)}")


def tokens_refused(out: Path | None) -> str:
    """Why patch tokens cannot go to `out` (JSON lines when None), and what to write instead."""
    fix = "give -o OUT.npy (load it with np.load(OUT, mmap_mode='r')) or -o OUT.parquet"
    if out is None:
        return f"patch tokens are not written as JSON lines on stdout (hundreds of KB an image): {fix}"
    if out.suffix.lower() == ".npz":
        return ("patch tokens are not written to .npz: a .npz member cannot be memory-mapped, so loading it "
                f"reads every token into memory; {fix}")  # fmt: skip
    return f"patch tokens cannot be written to {out.name!r}: {fix}"


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _npy_header(rows: int, layout: Layout) -> bytes:
    """A version 1.0 .npy header for [rows, *layout.shape] of the layout's dtype, padded to `_NPY_HEADER_BYTES`."""
    descr = np.dtype(layout.dtype).newbyteorder("<").str
    shape = repr((rows, *layout.shape))
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode("latin1")
    body = _NPY_HEADER_BYTES - 10  # magic (6) + version (2) + length (2)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + text + b" " * (body - len(text) - 1) + b"\n"


def _with_shape(layout: Layout, count: int, rows: np.ndarray) -> Layout:
    """The layout once rows have come: their shape fixes a size not known before; another shape is an error."""
    shape = tuple(rows.shape[1:])
    if count and shape != layout.shape:
        raise ValueError(f"row shape changed from {layout.shape} to {shape}")
    return Layout(shape, layout.dtype)


class NpyWriter:
    """[N, *row shape] .npy written row by row (header rewritten at the end); ids one per line beside it."""

    def __init__(self, out: Path, ids_out: Path | None, layout: Layout | None = None) -> None:
        self.out, self.ids_out = out, ids_out
        self.rows, self.layout = 0, layout or Layout()
        self._data = open(_partial(out), "wb")  # noqa: SIM115 - closed in close()/abort()
        self._data.write(_npy_header(0, self.layout))
        self._ids = open(_partial(ids_out), "w", encoding="utf-8", newline="\n") if ids_out else None  # noqa: SIM115

    def add(self, ids: list[str], rows: np.ndarray) -> None:
        if not ids:
            return
        self.layout = _with_shape(self.layout, self.rows, rows)
        self._data.write(np.ascontiguousarray(rows, dtype=np.dtype(self.layout.dtype).newbyteorder("<")).tobytes())
        self.rows += len(ids)
        if self._ids is not None:
            for image_id in ids:
                if "\n" in image_id or "\r" in image_id:
                    raise ValueError(f"id {image_id!r} has a line break; write .npz or .parquet instead")
                self._ids.write(image_id + "\n")

    def close(self) -> None:
        self._data.seek(0)
        self._data.write(_npy_header(self.rows, self.layout))
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

    def __init__(self, out: Path, layout: Layout | None = None) -> None:
        self.out = out
        self._rows = NpyWriter(out.with_name(out.name + ".rows.npy"), None, layout)
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
    """Parquet with columns `id` (string) and `embedding` (fixed-size list of float32); needs pyarrow.

    Patch tokens go to a `patch_tokens` column instead, one fixed-size list of rows x cols x D values
    (float32, or float16 as Arrow's halffloat) per image, row-major (token r * cols + c, then its D
    values); the schema's metadata `patch_tokens` holds `{"rows", "cols", "dim"}` as JSON.
    """

    def __init__(self, out: Path, layout: Layout | None = None) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("writing .parquet needs pyarrow (pip install pyarrow); or write .npy or .npz") from None
        self.out = out
        self.layout = layout or Layout()
        self.rows = 0
        self._writer = None

    def _schema(self):  # type: ignore[no-untyped-def]  # a pyarrow.Schema; pyarrow is imported lazily
        import pyarrow as pa

        values = pa.float16() if self.layout.dtype == "float16" else pa.float32()
        column = "patch_tokens" if self.layout.tokens else "embedding"
        schema = pa.schema([("id", pa.string()), (column, pa.list_(values, math.prod(self.layout.shape)))])
        if not self.layout.tokens:
            return schema
        rows, cols, dim = self.layout.shape
        return schema.with_metadata({"patch_tokens": json.dumps({"rows": rows, "cols": cols, "dim": dim})})

    def add(self, ids: list[str], rows: np.ndarray) -> None:
        if not ids:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.layout = _with_shape(self.layout, self.rows, rows)
        self.rows += len(ids)
        schema = self._schema()
        values = pa.array(np.ascontiguousarray(rows, dtype=self.layout.dtype).reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, math.prod(self.layout.shape))
        table = pa.Table.from_arrays([pa.array(ids, pa.string()), column], schema=schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(_partial(self.out)), schema)
        self._writer.write_table(table)

    def close(self) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:  # no rows: an empty file with the schema
            pq.write_table(self._schema().empty_table(), str(_partial(self.out)))
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
