"""The job's manifest: what a dataset job embeds with (model, options, inputs), kept beside its shards.

Rows written by one model or with one set of options must never be mixed with
rows of another, so a job records what the server said it runs (`Info`) and
the options it asked for, and a job resumed against anything else is refused.
The manifest is small JSON, rewritten atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT = 2  # 2: ids relative to the common folder of the inputs (1 named them as given)


# 0 or "": not known (yet), matches any
_LEARNED = ("dim", "embedding_dim", "token_rows", "token_cols", "image_size", "preprocess")


class ManifestMismatch(ValueError):
    """A resumed job would mix rows of different models, options or inputs."""


@dataclass(frozen=True)
class Identity:
    """What makes two rows comparable: the model as the server describes it, and the options asked for.

    `dim` is the length of one pooled row (twice the model's size for cls_mean); 0 while not known
    (a RunPod endpoint says nothing about itself until the first embedding comes back).
    `patch_tokens` names the dtype of a job whose rows are each image's patch tokens instead
    ("" for pooled embeddings; then `pooling` and `normalize` are not used): a row is
    [token_rows, token_cols, dim] and `dim` the model's size. A manifest written before these
    fields existed reads as a pooled job.
    `image_size` and `preprocess`: the server's input (`Info`); 0 and "" when not known (a RunPod
    endpoint, a server from before they were reported, a manifest from before they were recorded).
    """

    model_id: str
    revision: str
    dtype: str
    embedding_dim: int
    pooling: str
    normalize: bool
    dim: int = 0
    patch_tokens: str = ""
    normalize_tokens: bool = False
    token_rows: int = 0
    token_cols: int = 0
    image_size: int = 0
    preprocess: str = ""

    def differences(self, other: Identity) -> list[str]:
        """`name: ours vs theirs` for each field that differs (an unknown size or input matches any)."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in _LEARNED and (not mine or not theirs):
                continue
            if mine != theirs:
                out.append(f"{f.name} {mine!r} vs {theirs!r}")
        return out

    def describe(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        if self.patch_tokens:
            what = f"patch tokens {self.patch_tokens}" + (", normalized" if self.normalize_tokens else "")
        else:
            what = f"pooling {self.pooling}" + (", normalized" if self.normalize else "")
        served = f", {self.preprocess or 'input'} {self.image_size}" if self.image_size else ""
        return f"{self.model_id}{revision} ({self.dtype or 'dtype unknown'}{served}, {what})"


@dataclass(frozen=True)
class Manifest:
    """One job: its identity, its inputs, and where it stands."""

    identity: Identity
    inputs: tuple[str, ...]
    from_list: str | None
    output: str
    created: str = field(default_factory=lambda: _now())
    updated: str = field(default_factory=lambda: _now())
    complete: bool = False
    rows: int = 0
    failed: int = 0
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = list(self.inputs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") == 1:
            raise ManifestMismatch("the job was written by an earlier client, which named images differently "
                                   "(ids are now relative to the inputs' common folder); "
                                   "give --overwrite to start again, or write to another OUT")  # fmt: skip
        if data.get("format") != FORMAT:
            raise ManifestMismatch(f"job state of format {data.get('format')!r}; this client reads format {FORMAT}")
        values = dict(data)
        values["identity"] = Identity(**data["identity"])
        values["inputs"] = tuple(data["inputs"])
        return cls(**values)

    def with_updates(self, **changes: Any) -> Manifest:
        return replace(self, updated=_now(), **changes)

    def check_resumable(self, identity: Identity, inputs: tuple[str, ...], from_list: str | None) -> None:
        """Raises `ManifestMismatch`, saying what differs, unless a job with these may continue this one."""
        problems = self.identity.differences(identity)
        if problems:
            raise ManifestMismatch(
                f"this job was started with {self.identity.describe()}, but now runs with {identity.describe()} "
                f"({'; '.join(problems)}); its rows would not be comparable"
            )
        if _normal(self.inputs, self.from_list) != _normal(inputs, from_list):
            listed = f" --from-list {self.from_list}" if self.from_list else ""
            raise ManifestMismatch(f"this job was started for other inputs: {' '.join(self.inputs)}{listed}")


def _normal(inputs: tuple[str, ...], from_list: str | None) -> tuple[tuple[str, ...], str | None]:
    """Inputs as compared on resume: `photos/` and `photos` are the same argument."""
    return tuple(os.path.normpath(i) for i in inputs), None if from_list is None else os.path.normpath(from_list)


def read(path: Path) -> Manifest | None:
    """The manifest at `path`, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ManifestMismatch):
            raise
        raise ManifestMismatch(f"{path} is not a job manifest this client can read: {exc}") from None


def write(path: Path, manifest: Manifest) -> None:
    """Replaces the manifest atomically: a crash leaves the old one or the new one, never a mix."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(manifest.to_json(), out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsyncs a folder, so that a rename in it survives a power cut (best effort where unsupported)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
