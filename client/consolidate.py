"""Turns a job's shards into its output, in input order, whatever order and runs the rows came in.

Rows reach the shards out of order across runs (an interrupted run leaves
holes that the next one fills), so the output is assembled by position: each
committed row's id is looked up in the current listing of the inputs (id ->
position), the rows are sorted by position, and written in chunks, reading
each shard when its rows come up (a few shards are kept in memory). A row
whose image is no longer among the inputs is left out; a row committed twice
(an interrupt between a shard's rename and its bookkeeping) is written once.
The output is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.errors import ItemError
from client.manifest import sync_folder
from client.output import Layout, open_writer
from client.shards import failure_line, read_ids, read_shard

_CHUNK_ROWS = 8192
_CACHED_SHARDS = 8
_POOLED_ROW_BYTES = 2 * 1536 * 4  # a row of unknown size (a RunPod job's first) is pooled: cls_mean of a giant at most
_ROW = [("position", np.int64), ("shard", np.int32), ("row", np.int32)]


@dataclass(frozen=True)
class Consolidated:
    rows: int
    dim: int
    left_out: int  # rows of images no longer among the inputs


def failures_path(out: Path) -> Path:
    """The failures file of an output: `emb.parquet` -> `emb.parquet.failures.jsonl`.

    The whole name, suffix included, so that `emb.parquet` and `emb.npy` each have their own.
    """
    return out.with_name(out.name + ".failures.jsonl")


def consolidate(
    shards: list[Path],
    out: Path,
    positions: Mapping[str, int],
    layout: Layout | None = None,
    chunk_bytes: int = 32 * 2**20,
    cache_bytes: int = 128 * 2**20,
) -> Consolidated:
    """Writes every row of `shards` whose id is in `positions` to `out`, ordered by position.

    `layout`: what a row holds, declared even when there are no rows ([0, D]). Memory is bounded by
    `chunk_bytes` of rows being written (at most 8192 rows) and `cache_bytes` of shards kept read
    (at most 8 shards, at least one): patch tokens are hundreds of KB a row.
    """
    layout = layout or Layout()
    order, left_out, longest = _order(shards, positions)
    row_bytes = layout.row_bytes or _POOLED_ROW_BYTES
    chunk_rows = max(1, min(_CHUNK_ROWS, chunk_bytes // row_bytes))
    cached = max(1, min(_CACHED_SHARDS, cache_bytes // max(1, longest * row_bytes)))
    load = functools.lru_cache(maxsize=cached)(read_shard)
    writer = open_writer(out, None, layout)  # type: ignore[arg-type]
    dim = layout.shape[-1]
    try:
        for start in range(0, len(order), chunk_rows):
            chunk = order[start : start + chunk_rows]
            ids: list[str] = [""] * len(chunk)
            block: np.ndarray | None = None
            for shard_index in np.unique(chunk["shard"]).tolist():
                where = np.flatnonzero(chunk["shard"] == shard_index)
                rows = chunk["row"][where]
                shard_ids, embeddings = load(shards[shard_index])
                if block is None:
                    block = np.empty((len(chunk), *embeddings.shape[1:]), dtype=layout.dtype)
                block[where] = embeddings[rows]
                for slot, row in zip(where.tolist(), rows.tolist(), strict=True):
                    ids[slot] = shard_ids[row]
            assert block is not None
            dim = block.shape[-1]
            writer.add(ids, block)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    sync_folder(out.parent)
    return Consolidated(len(order), dim, left_out)


def _order(shards: list[Path], positions: Mapping[str, int]) -> tuple[np.ndarray, int, int]:
    """(position, shard, row) of every row to write, sorted by position, one per position; the rows left
    out; the most rows a shard holds."""
    parts = []
    left_out = longest = 0
    for shard_index, shard in enumerate(shards):
        found = np.array([positions.get(image_id, -1) for image_id in read_ids(shard)], dtype=np.int64)
        keep = np.flatnonzero(found >= 0)
        left_out += len(found) - len(keep)
        longest = max(longest, len(found))
        part = np.empty(len(keep), dtype=_ROW)
        part["position"], part["shard"], part["row"] = found[keep], shard_index, keep
        parts.append(part)
    if not parts:
        return np.empty(0, dtype=_ROW), 0, 0
    everything = np.concatenate(parts)
    everything = everything[np.argsort(everything["position"], kind="stable")]
    first = np.ones(len(everything), dtype=bool)
    first[1:] = everything["position"][1:] != everything["position"][:-1]
    return everything[first], left_out, longest


def write_failures(out: Path, failures: Mapping[str, ItemError], positions: Mapping[str, int]) -> int:
    """The failures file next to `out`, in input order (removed when nothing failed); returns its length."""
    path = failures_path(out)
    listed = sorted((positions[i], i, e) for i, e in failures.items() if i in positions)
    if not listed:
        path.unlink(missing_ok=True)
        return 0
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "w", encoding="utf-8") as lines:
        for _, image_id, error in listed:
            lines.write(failure_line(image_id, error) + "\n")
        lines.flush()
        os.fsync(lines.fileno())
    os.replace(temporary, path)
    return len(listed)
