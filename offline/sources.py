"""Which files a job reads, and the id of each image, as Ray Data lists them.

A SOURCE is a file, a folder (read recursively), a local glob, or any URI Ray
Data reads (`s3://bucket/prefix/`, `gs://...`): local globs are expanded here,
sorted; everything else is listed by Ray's own `read_binary_files`, whose
`partition_filter` hook (`Selector`) sees every listed path on the driver
before a byte is read. The selector keeps image files whose id has no row yet,
and every tar archive (`.tar`, `.tar.gz`, ...; WebDataset shards are tar
files), whose members are listed, and skipped when done, in the decode stage.

Ids follow the client's rule (client/sources.py), so the same file gets the
same id in both: a file's id is its path relative to the common folder of all
sources (a folder counts as itself, a file or a glob as the folder it is in;
object stores as `bucket/prefix`); an archive member's is
`ARCHIVE_ID/member/path`, its name normalized (`./a.jpg` is `a.jpg`). Two
different files therefore never share an id. Folders keep only files with an
image extension or a tar suffix (the others are counted); a file named on the
command line is always taken. Ray's listing skips names starting with `.` or `_`.
"""

from __future__ import annotations

import glob
import os
import posixpath
from collections.abc import Sequence

from offline.ledger import ARCHIVE_SUFFIXES, DigestSet

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})  # fmt: skip


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


def root_of(sources: Sequence[str]) -> str:
    """The folder ids are relative to: the common folder of every source's own folder.

    Local: an absolute path. Object stores: `bucket/prefix`, as Ray lists their keys.
    Local sources and URIs in one job are a usage error: they have no common folder.
    """
    uris = [s for s in sources if is_uri(s)]
    if uris and len(uris) != len(sources):
        raise InputError("give local paths or URIs, not both: their ids would have no common folder")
    anchors = [_anchor(s) for s in sources]
    if uris:
        return posixpath.commonpath(anchors) if len({a.split("/")[0] for a in anchors}) == 1 else ""
    return os.path.commonpath(anchors)


def _anchor(source: str) -> str:
    if is_uri(source):
        key = source.split("://", 1)[1].rstrip("/")
        return posixpath.dirname(key) if is_image_name(key) or is_archive_name(key) else key
    path = os.path.abspath(source)
    if os.path.isdir(path):
        return path
    if any(char in source for char in "*?["):
        head = path
        while any(char in head for char in "*?["):
            head = os.path.dirname(head)
        return head
    return os.path.dirname(path)


def image_id(path: str, root: str) -> str:
    """The id of a file as Ray lists it (absolute local path, or `bucket/key`)."""
    if not root:
        return path
    prefix = root.rstrip("/") + "/"
    if path.startswith(prefix):  # what Ray lists under the sources: a slice, not a relpath per file
        return path[len(prefix) :]
    relative = posixpath.relpath(path, root) if not os.path.isabs(path) else os.path.relpath(path, root)
    return relative.replace(os.sep, "/")


def member_id(archive_id: str, name: str) -> str:
    """The id of an archive member: `./a.jpg`, `a//b.jpg` and `/a.jpg` name `a.jpg`, `a/b.jpg`, `a.jpg`."""
    return f"{archive_id}/{posixpath.normpath(name).lstrip('/')}"


class Selector:
    """Ray's `partition_filter`: keeps the files to read, and counts what it passed over.

    Called once, on the driver, with every path Ray listed.
    """

    def __init__(self, named: Sequence[str], done: DigestSet, root: str) -> None:
        self.named = frozenset(p for p in named if os.path.isfile(p))
        self.done = done
        self.root = root
        self.listed = 0
        self.kept = 0
        self.skipped_done = 0
        self.non_images = 0
        self.archives = 0

    def __call__(self, paths: list[str]) -> list[str]:
        self.listed = len(paths)
        archive = [is_archive_name(p) for p in paths]
        image = [not a and (is_image_name(p) or _local(p) in self.named) for p, a in zip(paths, archive, strict=True)]
        done = iter(self.done.holds_ids([image_id(p, self.root) for p, i in zip(paths, image, strict=True) if i]))
        kept = []
        for path, is_archive, is_image in zip(paths, archive, image, strict=True):
            if is_archive:
                self.archives += 1
                kept.append(path)
            elif not is_image:
                self.non_images += 1
            elif next(done):
                self.skipped_done += 1
            else:
                kept.append(path)
        self.kept = len(kept)
        return kept


def _local(path: str) -> str:
    return os.path.abspath(path) if not is_uri(path) else path
