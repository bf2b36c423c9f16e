"""The job's manifest, OUT_DIR/manifest.json: what its rows were embedded with, and where the job stands.

Rows of one model, dtype or pooling must never be mixed with rows of another,
so a job records its identity before the first row is written and a later run
with another identity is refused (unless `--overwrite`, which starts again).
The format follows the client's job manifest (client/manifest.py), without
importing it: the client package pulls in grpc.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

FORMAT = 2  # 2: ids relative to the common folder of the sources (1: absolute paths)


class ManifestMismatch(ValueError):
    """A run would mix rows of different models, options or inputs in one OUT_DIR."""


@dataclass(frozen=True)
class Identity:
    """What makes two rows comparable. `dtype` is the one the actors resolved (auto -> float32 on CPU);
    `image_size` and `preprocess` the served input (a manifest written before they were recorded was
    embedded at card 224, their defaults)."""

    model_id: str
    revision: str
    dtype: str
    embedding_dim: int
    pooling: str
    normalize: bool
    dim: int
    image_size: int = 224
    preprocess: str = "card"

    def differences(self, other: Identity) -> list[str]:
        return [
            f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def describe(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        norm = ", normalized" if self.normalize else ""
        served = f"{self.preprocess} {self.image_size}"
        return f"{self.model_id}{revision} ({self.dtype}, {served}, pooling {self.pooling}{norm})"


@dataclass(frozen=True)
class Manifest:
    identity: Identity
    sources: tuple[str, ...]
    created: str = field(default_factory=lambda: _now())
    updated: str = field(default_factory=lambda: _now())
    complete: bool = False
    rows: int = 0
    failed: int = 0
    format: int = FORMAT

    def to_text(self) -> str:
        data = asdict(self)
        data["sources"] = list(self.sources)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_text(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") == 1:
                raise ManifestMismatch(f"{where} was written by an earlier version, which named images by their "
                                       "absolute paths (ids are now relative to the sources' common folder); "
                                       "give --overwrite to start again, or write to another folder")  # fmt: skip
            if data.get("format") != FORMAT:
                raise ManifestMismatch(f"{where} is of format {data.get('format')!r}; this version reads {FORMAT}")
            values = dict(data)
            values["identity"] = Identity(**data["identity"])
            values["sources"] = tuple(data["sources"])
            return cls(**values)
        except ManifestMismatch:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestMismatch(f"{where} is not a job manifest this version can read: {exc}") from None

    def with_updates(self, **changes: Any) -> Manifest:
        return replace(self, updated=_now(), **changes)

    def check_resumable(self, identity: Identity, sources: tuple[str, ...]) -> None:
        """Raises `ManifestMismatch`, saying what differs, unless a run with these may continue this job."""
        problems = self.identity.differences(identity)
        if problems:
            raise ManifestMismatch(
                f"this job was started with {self.identity.describe()}, but now runs with {identity.describe()} "
                f"({'; '.join(problems)}); its rows would not be comparable"
            )
        if self.sources != sources:
            raise ManifestMismatch(f"this job was started for other inputs: {' '.join(self.sources)}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
