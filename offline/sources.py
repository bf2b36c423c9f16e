"""Which files a job reads, and the id of each image, as Ray Data lists them.

A SOURCE is a file, a folder (read recursively), a local glob, or any URI Ray
Data reads (`s3://bucket/prefix/`, `gs://...`): local globs are expanded here,
sorted; everything else is listed by Ray's own `read_binary_files`, whose
`partition_filter` hook (`Selector`) sees every listed path on the driver
before a byte is read. The selector keeps image files whose id has no row yet,
and every tar archive (`.tar`, `.tar.gz`, ...; WebDataset shards are tar
files), whose members are listed, and skipped when done, in the decode stage.

Ids: a file's id is its path as Ray lists it (absolute for local files,
`bucket/key` for object stores); an archive member's is `ARCHIVE/member/path`.
Folders keep only files with an image extension or a tar suffix (the others
are counted); a file named on the command line is always taken. Ray's listing
skips names starting with `.` or `_`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Container, Sequence

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})  # fmt: skip
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class InputError(ValueError):
    """A named path does not exist, or a pattern matched nothing."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def is_uri(source: str) -> bool:
    return "://" in source


def expand(sources: Sequence[str]) -> list[str]:
    """The paths to hand to Ray: local globs expanded (sorted), local paths checked, URIs as given."""
    if not sources:
        raise InputError("give images to embed: files, folders, globs, tar shards or URIs (s3://...)")
    paths: list[str] = []
    for source in sources:
        if is_uri(source):
            paths.append(source)
        elif os.path.exists(source):
            paths.append(os.path.abspath(source))
        elif any(char in source for char in "*?["):
            matches = sorted(m for m in glob.glob(source, recursive=True) if os.path.isfile(m))
            kept = [os.path.abspath(m) for m in matches if is_image_name(m) or is_archive_name(m)]
            if not kept:
                raise InputError(f"no image files or tar archives match {source!r}")
            paths.extend(kept)
        else:
            raise InputError(f"no such file or folder: {source}")
    return paths


class Selector:
    """Ray's `partition_filter`: keeps the files to read, and counts what it passed over.

    Called once, on the driver, with every path Ray listed.
    """

    def __init__(self, named: Sequence[str], done: Container[str]) -> None:
        self.named = frozenset(p for p in named if os.path.isfile(p))
        self.done = done
        self.listed = 0
        self.kept = 0
        self.skipped_done = 0
        self.non_images = 0
        self.archives = 0

    def __call__(self, paths: list[str]) -> list[str]:
        kept = []
        self.listed = len(paths)
        for path in paths:
            if is_archive_name(path):
                self.archives += 1
                kept.append(path)
            elif not (is_image_name(path) or _local(path) in self.named):
                self.non_images += 1
            elif path in self.done:
                self.skipped_done += 1
            else:
                kept.append(path)
        self.kept = len(kept)
        return kept


def _local(path: str) -> str:
    return os.path.abspath(path) if not is_uri(path) else path
