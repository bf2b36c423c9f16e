"""Which files a command line names: files, folders (recursive) and glob patterns, with their ids.

A file given by name keeps that name as its id; files found in a folder are
named relative to the folder (so ids do not depend on where the folder was
mounted); glob matches keep the path as matched. Folders and globs keep only
files with an image extension; order is sorted, so runs are reproducible.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})  # fmt: skip


class InputError(ValueError):
    """A named path does not exist, or a pattern matched nothing."""


@dataclass(frozen=True)
class InputFile:
    id: str
    path: Path


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_magic(text: str) -> bool:
    return any(char in text for char in "*?[")


def _folder(root: Path) -> list[InputFile]:
    found = []
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if is_image_name(name):
                path = Path(parent, name)
                found.append(InputFile(path.relative_to(root).as_posix(), path))
    return found


def collect(arguments: list[str]) -> list[InputFile]:
    """Expands command-line paths into image files, in argument order; raises `InputError` for a missing one."""
    found: list[InputFile] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found.extend(_folder(path))
        elif path.exists() or path.is_symlink():
            found.append(InputFile(argument, path))
        elif _has_magic(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            files = [
                InputFile(match, Path(match)) for match in matches if os.path.isfile(match) and is_image_name(match)
            ]
            if not files:
                raise InputError(f"no image files match {argument!r}")
            found.extend(files)
        else:
            raise InputError(f"no such file or folder: {argument}")
    return found


def duplicate_ids(files: list[InputFile]) -> list[str]:
    """Ids that occur more than once (two folders with the same layout, a file named twice)."""
    seen: set[str] = set()
    duplicates: dict[str, None] = {}
    for file in files:
        if file.id in seen:
            duplicates[file.id] = None
        seen.add(file.id)
    return list(duplicates)
