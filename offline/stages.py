"""The job's task stages: decode (before the embed actors, offline/embed.py) and write (after them).

Rows between stages are numpy batches with `id` and `error_code` / `error`
(empty strings when the image is fine). A bad image is a row with an error
from the decode stage on; no stage raises for one image, so no batch fails
because of one. Decoding is exactly the gRPC service's (server/service.py
`_embed_one`): `server.preprocess.decode`. This module does not import
PyTorch, so the decode and write workers stay small.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from offline.ledger import DigestSet
from offline.lock import check_token
from offline.sources import image_id, is_archive_name, is_image_name, member_id
from offline.store import Store
from server.config import Settings
from server.errors import InvalidImage
from server.geometry import Geometry
from server.preprocess import ImageLimits, decode

INVALID_ARGUMENT, INTERNAL = "INVALID_ARGUMENT", "INTERNAL"  # the gRPC service's codes for these failures
_CHUNK_ROWS = 64  # decode output rows per yielded batch: a tar shard streams out in pieces

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """Test hook: the stage kills its worker process once, right after its `after`-th batch (marker file = once)."""

    stage: str  # "embed" or "write"
    after: int
    marker: str

    def maybe_die(self, stage: str, batches: int) -> None:
        if stage != self.stage or batches < self.after:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


class _Rows:
    """Decode output being gathered: ids, pixels, error codes and messages."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.size = geometry.size
        self.ids: list[str] = []
        self.pixels: list[np.ndarray] = []
        self.codes: list[str] = []
        self.errors: list[str] = []

    def add(self, image_id: str, pixels: np.ndarray | None, code: str = "", error: str = "") -> None:
        self.ids.append(image_id)
        self.pixels.append(pixels if pixels is not None else np.zeros((self.size, self.size), np.uint8))
        self.codes.append(code)
        self.errors.append(error)

    def take(self) -> dict[str, np.ndarray]:
        batch = {
            "id": np.array(self.ids, dtype=object),
            "pixels": np.stack(self.pixels) if self.pixels else np.zeros((0, self.size, self.size), np.uint8),
            "error_code": np.array(self.codes, dtype=object),
            "error": np.array(self.errors, dtype=object),
        }
        self.__init__(self.geometry)  # type: ignore[misc]
        return batch


def decode_batch(
    batch: dict[str, np.ndarray], geometry: Geometry, limits: ImageLimits, done: DigestSet, root: str
) -> Iterator[dict[str, np.ndarray]]:
    """Files (`path`, `bytes`) -> one row per image; a tar file's image members each make a row, its pixels
    resized (and cropped) as `geometry` says.

    `done` holds the archive members that have a row already; `root` is what ids are relative to.
    """
    rows = _Rows(geometry)
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        if is_archive_name(path):
            for member, image in _members(image_id(path, root), data, done):
                if isinstance(image, str):
                    rows.add(member, None, INVALID_ARGUMENT, image)
                else:
                    _decode_into(rows, member, image, limits)
                if len(rows.ids) >= _CHUNK_ROWS:
                    yield rows.take()
        else:
            _decode_into(rows, image_id(path, root), data, limits)
            if len(rows.ids) >= _CHUNK_ROWS:
                yield rows.take()
    if rows.ids:
        yield rows.take()


def _decode_into(rows: _Rows, image_id: str, data: bytes, limits: ImageLimits) -> None:
    try:
        rows.add(image_id, decode(bytes(data), limits, rows.geometry))
    except InvalidImage as exc:
        rows.add(image_id, None, INVALID_ARGUMENT, str(exc))
    except Exception as exc:  # a decoder bug must cost this image, not its batch; a rerun tries it again
        log.exception("decoding %s failed unexpectedly", image_id)
        rows.add(image_id, None, INTERNAL, f"decoding failed unexpectedly: {type(exc).__name__}: {exc}")


def _members(archive_id: str, data: bytes, done: DigestSet) -> Iterator[tuple[str, bytes | str]]:
    """An archive's image members in archive order, as (id, bytes) or (id, why unreadable); done ones skipped.

    An archive that cannot be opened, or ends early, is one failure under the archive's own id.
    """
    members = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                tar.members = []  # keep memory flat on big shards
                if not member.isfile():
                    continue
                members += 1
                name = member_id(archive_id, member.name)
                if not is_image_name(member.name) or name in done:
                    continue
                extracted = tar.extractfile(member)
                yield name, extracted.read() if extracted is not None else "archive member is not a file"
    except (OSError, tarfile.TarError, EOFError) as exc:
        if archive_id not in done:
            yield archive_id, f"not a readable tar archive (after {members} members): {exc}"


def write_batch(
    batch: dict[str, np.ndarray], store: Store, run: str, fault: Fault | None = None
) -> dict[str, np.ndarray]:
    """Writes the batch as one part of OUT_DIR, if the run `run` still holds it; passes on only ids and errors."""
    check_token(store, run)
    store.write_part(
        [str(i) for i in batch["id"]],
        np.asarray(batch["embedding"], dtype=np.float32),
        [str(c) for c in batch["error_code"]],
        [str(e) for e in batch["error"]],
    )
    if fault is not None:
        fault.maybe_die("write", 1)
    return {"id": batch["id"], "error_code": batch["error_code"], "error": batch["error"]}


def limits_of(settings: Settings) -> ImageLimits:
    return ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
