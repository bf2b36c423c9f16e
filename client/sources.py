"""Which images a job embeds, in one deterministic order: files, folders, globs, lists and tar archives.

The order is the output's row order, so it must not depend on timing or on the
file system's listing order: arguments in the order given; a folder walked
recursively with its entries sorted; glob matches sorted; a list file's lines
in order; an archive's members in archive order. Inputs are listed lazily, so
a job over millions of images never holds their list (only its caller's ids).

Ids name the file, so that two different files never share one: an id is
the file's path relative to the common folder of all arguments (a folder
counts as itself, a file or a glob as the folder it is in; with
`--from-list`, the current folder too, as its lines are paths from there).
`photos/` alone gives `0001.jpg`; `train/ val/` give `train/0001.jpg` and
`val/0001.jpg`; a listed file outside that folder keeps its absolute path.
An archive's members are `ARCHIVE/member/path`, ARCHIVE being the archive's
own id and the member's name normalized (`./a.jpg` is `a.jpg`). The offline
job (offline/sources.py) gives the same file the same id. Folders, globs and
archives keep only files with an image extension (the others are counted as
skipped); a file named explicitly is always taken.
"""

from __future__ import annotations

import glob
import os
import posixpath
import tarfile
import threading
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path

from client.errors import ItemError

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})  # fmt: skip
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_NOT_FOUND, _INVALID_ARGUMENT = 5, 3


class InputError(ValueError):
    """A named path does not exist, or a pattern matched nothing."""


@dataclass(frozen=True)
class Source:
    """One input: its id and what to send: a file to read, an archive member's bytes, or why there is none."""

    id: str
    image: Path | bytes | ItemError


@dataclass
class Tally:
    """What listing the inputs passed over: files without an image extension, per kind of source."""

    non_images: int = 0


Select = Callable[[str], bool]
"""Called once per input id, in order; an input is read and yielded only when it returns True."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _has_magic(text: str) -> bool:
    return any(char in text for char in "*?[")


@dataclass(frozen=True)
class Inputs:
    """The inputs of one job: command-line arguments and an optional list file (read after them)."""

    arguments: tuple[str, ...] = ()
    from_list: Path | None = None

    def check(self) -> None:
        """Fails early, before any work, for a missing argument, a glob matching nothing, or no list file."""
        if not self.arguments and self.from_list is None:
            raise InputError("give images to embed: files, folders, globs, or --from-list FILE")
        for argument in self.arguments:
            path = Path(argument)
            if path.is_dir() and not _holds_images(path):
                raise InputError(f"no image files in {argument} (nor in its subfolders)")
            if path.exists() or path.is_symlink():
                continue
            if not _has_magic(argument):
                raise InputError(f"no such file or folder: {argument}")
            matches = glob.iglob(argument, recursive=True)
            if not any(os.path.isfile(m) and (is_image_name(m) or is_archive_name(m)) for m in matches):
                raise InputError(f"no image files match {argument!r}")
        if self.from_list is not None and not self.from_list.is_file():
            raise InputError(f"no such list file: {self.from_list}")

    def root(self) -> str:
        """The folder ids are relative to (absolute)."""
        anchors = [_anchor(a) for a in self.arguments]
        if self.from_list is not None:
            anchors.append(os.getcwd())
        return os.path.commonpath(anchors)

    def sources(self, select: Select, tally: Tally) -> Iterator[Source]:
        """Every input in order; `select(id)` decides, before anything is read, which ones are yielded."""
        names = _Names(self.root())
        for argument in self.arguments:
            yield from _argument(argument, names, select, tally)
        if self.from_list is not None:
            with open(self.from_list, encoding="utf-8") as lines:
                for line in lines:
                    entry = line.rstrip("\r\n")
                    if entry.strip():
                        yield from _listed(entry, names, select, tally)


class _Names:
    """Ids relative to one folder."""

    def __init__(self, root: str) -> None:
        self.root = root

    def of(self, path: str | Path) -> str:
        absolute = os.path.abspath(path)
        relative = os.path.relpath(absolute, self.root)
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            return Path(absolute).as_posix()
        return Path(relative).as_posix()


def member_id(archive_id: str, name: str) -> str:
    """The id of an archive member: `./a.jpg`, `a//b.jpg` and `/a.jpg` name `a.jpg`, `a/b.jpg`, `a.jpg`."""
    return f"{archive_id}/{posixpath.normpath(name).lstrip('/')}"


def _anchor(argument: str) -> str:
    path = os.path.abspath(argument)
    if os.path.isdir(path):
        return path
    if _has_magic(argument):
        while _has_magic(path):
            path = os.path.dirname(path)
        return path
    return os.path.dirname(path)


def _argument(argument: str, names: _Names, select: Select, tally: Tally) -> Iterator[Source]:
    path = Path(argument)
    if path.is_dir():
        yield from _folder(path, names, select, tally)
    elif is_archive_name(argument) and path.is_file():
        yield from _archive(path, names.of(path), select, tally)
    elif path.exists() or path.is_symlink():
        if select(image_id := names.of(path)):
            yield Source(image_id, path)
    elif _has_magic(argument):
        for match in sorted(glob.glob(argument, recursive=True)):
            if not os.path.isfile(match):
                continue
            if is_archive_name(match):
                yield from _archive(Path(match), names.of(match), select, tally)
            elif not is_image_name(match):
                tally.non_images += 1
            elif select(image_id := names.of(match)):
                yield Source(image_id, Path(match))
    elif select(image_id := names.of(argument)):  # gone since `check`: a failure like any unreadable file
        yield Source(image_id, ItemError(_NOT_FOUND, f"no such file or folder: {argument}"))


def _listed(entry: str, names: _Names, select: Select, tally: Tally) -> Iterator[Source]:
    """A list file's line: a file (not even stat'ed until read), or a folder or archive, expanded."""
    image_id = names.of(entry)
    if is_archive_name(entry):
        if os.path.isfile(entry):
            yield from _archive(Path(entry), image_id, select, tally)
        elif select(image_id):
            yield Source(image_id, ItemError(_NOT_FOUND, f"no such archive: {entry}"))
    elif not is_image_name(entry) and os.path.isdir(entry):
        yield from _folder(Path(entry), names, select, tally)
    elif select(image_id):
        yield Source(image_id, Path(entry))


def _holds_images(root: Path) -> bool:
    """Whether a folder holds an image or an archive anywhere below it; stops at the first."""
    return any(is_image_name(name) or is_archive_name(name) for _, _, files in os.walk(root) for name in files)


def _folder(root: Path, names: _Names, select: Select, tally: Tally) -> Iterator[Source]:
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        folder_id = names.of(parent)  # once per folder: a folder of a million files names each by a join
        for name in sorted(files):
            path = Path(parent, name)
            image_id = name if folder_id == "." else f"{folder_id}/{name}"
            if is_archive_name(name):
                yield from _archive(path, image_id, select, tally)
            elif not is_image_name(name):
                tally.non_images += 1
            elif select(image_id):
                yield Source(image_id, path)


def _archive(path: Path, archive_id: str, select: Select, tally: Tally) -> Iterator[Source]:
    """An archive's image members in archive order, read only when selected (headers alone otherwise).

    An archive that cannot be opened, or ends early, is one failure under the archive's own id.
    """
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed below
    except (OSError, tarfile.TarError) as exc:
        if select(archive_id):
            yield Source(archive_id, ItemError(_INVALID_ARGUMENT, f"not a readable tar archive: {exc}"))
        return
    members = 0
    try:
        while True:
            try:
                member = tar.next()
            except (OSError, tarfile.TarError, EOFError) as exc:
                if select(archive_id):
                    message = f"tar archive is damaged after {members} members: {exc}"
                    yield Source(archive_id, ItemError(_INVALID_ARGUMENT, message))
                return
            if member is None:
                return
            tar.members = []  # TarFile keeps every member it has read: keep memory flat on big archives
            if not member.isfile():
                continue
            members += 1
            if not is_image_name(member.name):
                tally.non_images += 1
                continue
            image_id = member_id(archive_id, member.name)
            if select(image_id):
                yield Source(image_id, _member_bytes(tar, member))
    finally:
        tar.close()


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | ItemError:
    try:
        data = tar.extractfile(member)
        return data.read() if data is not None else ItemError(_INVALID_ARGUMENT, "archive member is not a file")
    except (OSError, tarfile.TarError, EOFError) as exc:
        return ItemError(_INVALID_ARGUMENT, f"cannot read archive member: {exc}")


class InputCounter(threading.Thread):
    """Counts on the side the images this run will embed, for the progress total and ETA (best effort)."""

    def __init__(self, inputs: Inputs, skip: Container[str]) -> None:
        super().__init__(name="count-inputs", daemon=True)
        self.inputs, self.skip = inputs, skip
        self.total: int | None = None
        self.stopped = False

    def run(self) -> None:
        count = 0

        def select(image_id: str) -> bool:
            nonlocal count
            if self.stopped:
                raise _Stopped
            count += image_id not in self.skip
            return False

        try:
            for _ in self.inputs.sources(select, Tally()):
                pass
        except Exception:  # stopped, or an input changed under us: no total then
            return
        self.total = count


class _Stopped(Exception):
    pass
