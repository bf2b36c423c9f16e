"""Ids of the offline job (offline/sources.py) equal the client's for the same files, and never collide;
one decode that raises costs its own row (offline/stages.py)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client.sources import Inputs, Tally
from offline import sources as offline_sources
from offline import stages
from offline.ledger import DigestSet
from offline.sources import Selector, expand, image_id, member_id, root_of
from offline.stages import INTERNAL, decode_batch
from server.geometry import Geometry
from server.preprocess import ImageLimits
from tests import images


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """train/ and val/ with the same file names (different pictures), a tar shard with `./` members."""
    monkeypatch.chdir(tmp_path)
    for split, seed in (("train", 0), ("val", 100)):
        for n in range(3):
            path = tmp_path / "data" / split / f"{n:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(images.jpeg(32, 32, seed=seed + n))
    with tarfile.open(tmp_path / "data" / "shard.tar", "w") as tar:
        for name in ("./000.jpg", "sub//001.jpg"):
            data = images.jpeg(16, 16)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path


def _client_ids(arguments: tuple[str, ...]) -> list[str]:
    inputs = Inputs(arguments)
    inputs.check()
    return [s.id for s in inputs.sources(lambda _: True, Tally())]


def _offline_ids(arguments: tuple[str, ...]) -> list[str]:
    """What the offline job names the files Ray would list for these sources, archive members included."""
    paths = expand(arguments)
    root = root_of(paths)
    found = []
    for path in paths:
        walked = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
        for file in sorted(walked):
            if offline_sources.is_archive_name(file):
                with tarfile.open(file) as tar:
                    found += [member_id(image_id(file, root), m.name) for m in tar if m.isfile()]
            else:
                found.append(image_id(file, root))
    return found


def test_two_folders_with_the_same_names_give_different_ids_and_both_tools_agree(tree: Path) -> None:
    arguments = ("data/train/", "data/val")
    ids = _client_ids(arguments)
    assert ids == [f"{split}/{n:04d}.jpg" for split in ("train", "val") for n in range(3)]
    assert sorted(_offline_ids(arguments)) == sorted(ids)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (("data/train",), ["0000.jpg", "0001.jpg", "0002.jpg"]),  # one folder: names inside it
        (("data/val/0001.jpg",), ["0001.jpg"]),
        (("data/shard.tar",), ["shard.tar/000.jpg", "shard.tar/sub/001.jpg"]),  # members without ./ or //
        (("data/train/0000.jpg", "data/val/0000.jpg"), ["train/0000.jpg", "val/0000.jpg"]),
        (("data/*/0002.jpg",), ["train/0002.jpg", "val/0002.jpg"]),  # a glob: relative to its folder
    ],
)
def test_the_same_file_gets_the_same_id_in_the_client_and_the_offline_job(
    tree: Path, arguments: tuple[str, ...], expected: list[str]
) -> None:
    assert _client_ids(arguments) == expected
    assert sorted(_offline_ids(arguments)) == sorted(expected)


def test_a_list_file_names_files_from_the_current_folder(tree: Path) -> None:
    (tree / "list.txt").write_text("data/val/0000.jpg\n./data/val/0000.jpg\n/elsewhere/x.jpg\n")
    inputs = Inputs((), tree / "list.txt")
    ids = [s.id for s in inputs.sources(lambda _: True, Tally())]
    assert ids == ["data/val/0000.jpg", "data/val/0000.jpg", "/elsewhere/x.jpg"]  # one file, one id


def test_local_paths_and_uris_in_one_job_are_a_usage_error(tree: Path) -> None:
    with pytest.raises(offline_sources.InputError, match="not both"):
        root_of([str(tree / "data"), "s3://bucket/images/"])
    assert root_of(["s3://bucket/images/", "s3://bucket/more/a.jpg"]) == "bucket"
    assert image_id("bucket/images/x/1.jpg", "bucket") == "images/x/1.jpg"


def test_the_selector_skips_done_ids_and_counts_what_it_passed_over(tree: Path) -> None:
    paths = expand(("data",))
    root = root_of(paths)
    listed = [str(tree / "data" / "train" / "0000.jpg"), str(tree / "data" / "val" / "0000.jpg"),
              str(tree / "data" / "notes.txt"), str(tree / "data" / "shard.tar")]  # fmt: skip
    selector = Selector(paths, DigestSet.of(["train/0000.jpg"]), root)
    assert selector(listed) == [listed[1], listed[3]]
    assert (selector.skipped_done, selector.non_images, selector.archives) == (1, 1, 1)


def test_an_unexpected_exception_in_one_decode_fails_only_that_row(monkeypatch: pytest.MonkeyPatch) -> None:
    real = stages.decode

    def decode(data: bytes, limits: ImageLimits, size: int) -> np.ndarray:
        if data == b"poison":
            raise RuntimeError("a decoder bug")
        return real(data, limits, size)

    monkeypatch.setattr(stages, "decode", decode)
    batch = {"path": np.array(["/r/a.png", "/r/b.png", "/r/c.png"], dtype=object),
             "bytes": np.array([images.png(), b"poison", images.png()], dtype=object)}  # fmt: skip
    rows = _merge(decode_batch(batch, Geometry(14), ImageLimits(1 << 20, 1 << 20), DigestSet.of([]), "/r"))
    assert list(rows["id"]) == ["a.png", "b.png", "c.png"]
    assert list(rows["error_code"]) == ["", INTERNAL, ""]
    assert "RuntimeError: a decoder bug" in rows["error"][1]
    assert rows["pixels"][0].any() and rows["pixels"][2].any()


def _merge(batches: Iterator[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = list(batches)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
