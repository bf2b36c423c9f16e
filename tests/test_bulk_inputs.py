"""What a dataset job reads: files, folders, globs, list files and tar archives, in one defined order,
each id once; memory stays flat however long the input; consolidation survives crashes."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.backends import TokenAsk
from client.consolidate import consolidate, failures_path
from client.errors import ItemResult
from client.images import encode_many, take
from client.job import Job, JobOptions
from client.manifest import Identity
from client.shards import JobState, ShardWriter, parts_folder
from client.sources import Inputs, Tally
from tests import images
from tests.conftest import Reference, RunningServer, assert_close
from tests.test_bulk import read_npy, run


def add_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def webdataset(first: int, count: int) -> dict[str, bytes]:
    """WebDataset-style samples: `key.jpg` with `key.json` and `key.cls` beside it."""
    members = {}
    for key in range(first, first + count):
        members[f"{key:06d}.jpg"] = images.jpeg(48, 40, seed=key)
        members[f"{key:06d}.json"] = json.dumps({"key": key}).encode()
        members[f"{key:06d}.cls"] = b"3"
    return members


def listed(inputs: Inputs) -> tuple[list[str], Tally]:
    tally = Tally()
    return [source.id for source in inputs.sources(lambda image_id: True, tally)], tally


def test_listing_order_ids_and_skipped_non_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("z/b.png", "z/a.png", "z/sub/c.jpg", "z/notes.txt", "loose.webp", "g/2.png", "g/1.png", "g/x.txt"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(b"x")
    add_tar(Path("z/shard.tar"), {"k/0.png": b"x", "k/0.json": b"{}"})
    add_tar(Path("w.tar.gz"), webdataset(0, 2), "w:gz")
    Path("list.txt").write_text("loose.webp\nz\nw.tar.gz\n")
    inputs = Inputs(("loose.webp", "z", "g/*", "w.tar.gz"), Path("list.txt"))
    inputs.check()
    ids, tally = listed(inputs)
    assert ids == [
        "loose.webp",
        "z/a.png", "z/b.png", "z/shard.tar/k/0.png", "z/sub/c.jpg",  # the folder: sorted, the archive in place
        "g/1.png", "g/2.png",  # glob matches, sorted
        "w.tar.gz/000000.jpg", "w.tar.gz/000001.jpg",  # members in archive order
        "loose.webp", "z/a.png", "z/b.png", "z/shard.tar/k/0.png", "z/sub/c.jpg", "w.tar.gz/000000.jpg",
        "w.tar.gz/000001.jpg",  # the list file's lines, expanded the same way
    ]  # fmt: skip
    assert tally.non_images == 2 * (1 + 1 + 4) + 1  # notes.txt, k/0.json, 2x(.json, .cls); and g/x.txt once


def test_tar_members_are_embedded_repeats_once_and_a_bad_archive_is_one_failure(
    server: RunningServer, tmp_path: Path, reference: Reference
) -> None:
    first, second = tmp_path / "000000.tar", tmp_path / "000001.tar"
    members = webdataset(0, 5)
    add_tar(first, members)
    add_tar(second, webdataset(5, 3))
    broken = tmp_path / "000002.tar"
    broken.write_bytes(b"this is not a tar archive at all" * 40)
    out = tmp_path / "o.npy"
    code, _, stderr = run("embed", str(tmp_path / "0*.tar"), str(first), "--server", server.address, "-o", str(out))
    assert code == 1, stderr
    ids, rows = read_npy(out)
    assert ids == [f"{first.name}/{k:06d}.jpg" for k in range(5)] + [f"{second.name}/{k:06d}.jpg" for k in range(5, 8)]
    assert_close(rows[2], reference.embed(members["000002.jpg"]), "tar member")
    assert "26 non-image files skipped" in stderr and "5 inputs skipped as repeats" in stderr
    failed = [json.loads(line) for line in failures_path(out).read_text().splitlines()]
    assert [(f["id"], f["code"]) for f in failed] == [(broken.name, "INVALID_ARGUMENT")]
    assert "not a readable tar archive" in failed[0]["message"]


def test_ids_with_line_breaks_fail_for_npy_but_not_for_parquet(server: RunningServer, tmp_path: Path) -> None:
    odd = tmp_path / "line\nbreak.png"
    odd.write_bytes(images.png(seed=1))
    code, _, stderr = run("embed", str(odd), "--server", server.address, "-o", str(tmp_path / "o.npy"))
    assert code == 1 and "line break" in stderr
    code, _, stderr = run("embed", str(odd), "--server", server.address, "-o", str(tmp_path / "o.parquet"))
    assert code == 0, stderr


class FakeBackend:
    """Reads its inputs like the real clients (bounded: `batch` at a time) and answers at once."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim

    def identity(self, pooling: str, normalize: bool, tokens: TokenAsk | None = None) -> Identity:
        return Identity("fake", "", "float32", self.dim, pooling, normalize, self.dim)

    def embed_batches(self, pairs: Iterable[tuple[str, Any]], pooling: str, normalize: bool,
                      tokens: TokenAsk | None = None) -> Iterator[list[ItemResult]]:  # fmt: skip
        iterator, start = iter(pairs), 0
        while items := encode_many(take(iterator, 64), start):
            start += len(items)
            yield [ItemResult(i.index, i.id, embedding=np.full(self.dim, len(i.data) % 97, np.float32))
                   for i in items]  # fmt: skip

    def close(self) -> None:
        pass


def peak_bytes(paths: list[Path], tmp_path: Path, name: str) -> tuple[int, float]:
    """Traced peak memory of a whole job over `paths` (a --from-list file), and the output's row count."""
    listing = tmp_path / f"{name}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    out = tmp_path / f"{name}.npy"
    options = JobOptions(Inputs((), listing), out, shard_rows=512)
    stderr = io.StringIO()
    tracemalloc.start()
    try:
        code = Job(options, FakeBackend, io.StringIO(), stderr).run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0, stderr.getvalue()
    return peak, len(np.load(out, mmap_mode="r"))


def test_memory_stays_flat_over_a_long_list_of_images(tmp_path: Path) -> None:
    image = tmp_path / "big.png"
    image.write_bytes(os.urandom(256 * 1024))  # 256 KiB each: 20k of them held would be 5 GiB
    links = tmp_path / "links"
    links.mkdir()
    paths = []
    for index in range(20_000):
        path = links / f"{index:05d}.png"
        os.link(image, path)
        paths.append(path)
    small, rows_small = peak_bytes(paths[:2_000], tmp_path, "small")
    large, rows_large = peak_bytes(paths, tmp_path, "large")
    assert (rows_small, rows_large) == (2_000, 20_000)
    # Images read ahead are bounded by the request window; what grows is the ids (about 200 bytes each).
    assert large < 64 * 2**20, f"peak {large / 2**20:.1f} MiB"
    assert large - small < 18_000 * 400, f"peak grew by {(large - small) / 2**20:.1f} MiB"


def test_a_crash_while_consolidating_leaves_the_old_output_and_the_next_run_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for index in range(50):
        paths.append(tmp_path / f"{index:02d}.png")
        paths[-1].write_bytes(b"x" * (index + 1))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    out = tmp_path / "o.npy"
    options = JobOptions(Inputs((), listing), out, shard_rows=7)

    def crash(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("client.output.NpyWriter.close", crash)
    stderr = io.StringIO()
    assert Job(options, FakeBackend, io.StringIO(), stderr).run() == 3
    assert "error: the job stopped: disk full" in stderr.getvalue()
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    monkeypatch.undo()
    stderr = io.StringIO()
    assert Job(options, FakeBackend, io.StringIO(), stderr).run() == 0
    ids, rows = read_npy(out)
    assert ids == [str(p) for p in paths] and "50 done before" in stderr.getvalue()
    assert rows[:, 0].tolist() == [float((i + 1) % 97) for i in range(50)]


def test_consolidation_orders_by_position_writes_repeats_once_and_leaves_out_stale_rows(tmp_path: Path) -> None:
    state = JobState(parts_folder(tmp_path / "o.npy"))
    state.open()
    writer = ShardWriter(state, shard_rows=2)
    for image_id in ("c", "a", "gone", "b", "a"):  # "a" committed twice, "gone" no longer listed
        writer.add(image_id, np.full(3, ord(image_id[0]), np.float32))
    writer.commit()
    result = consolidate(state.shards(), tmp_path / "o.npy", {"a": 0, "b": 1, "c": 2})
    state.close()
    ids, rows = read_npy(tmp_path / "o.npy")
    assert ids == ["a", "b", "c"] and rows[:, 0].tolist() == [97.0, 98.0, 99.0]
    assert (result.rows, result.dim, result.left_out) == (3, 3, 1)
