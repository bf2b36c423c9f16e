"""What a decode worker process starts with: its settings and its environment, both free of secrets."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from server.geometry import Geometry
from server.preprocess import ImageLimits

SMALL_PIXELS = 2_000_000
"""Images up to this many pixels are decoded without asking for the budget: a round trip per
image would cost more than they do, and each child holds at most one such image at once."""

_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH")
"""The variables a child may need to start Python and find its packages; nothing else crosses
(API keys, tokens and cloud credentials stay in the server)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a child needs to decode like the server; it travels as JSON on the child's command line."""

    limits: ImageLimits
    image_size: int
    idle_trim_s: float  # idle this long after work, the child gives its freed memory back
    timeout_s: float = 30.0  # an image the child takes longer over is stopped, with its child
    resize: bool = True  # False: images are handed back at full size (`--resize-on device`)
    fast: bool = False  # `--decode fast`
    shortest_edge: int | None = None  # `--preprocess checkpoint`: resized to this, then center-cropped

    @classmethod
    def of(cls, limits: ImageLimits, geometry: Geometry, idle_trim_s: float, timeout_s: float = 30.0,
           resize: bool = True, fast: bool = False) -> Setup:  # fmt: skip
        return cls(limits, geometry.size, idle_trim_s, timeout_s, resize, fast, geometry.shortest_edge)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.image_size, self.shortest_edge)

    @property
    def result_size(self) -> int | None:
        """The side of every image handed back, or None when they come at full size."""
        return self.image_size if self.resize else None

    @property
    def result_pixels(self) -> int:
        """The most pixels one handed-back image can have."""
        return self.image_size * self.image_size if self.resize else self.limits.max_pixels

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Setup:
        return cls(**{**fields, "limits": ImageLimits(**fields["limits"])})


def child_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment a decode worker process gets: an allowlist of the server's."""
    return {name: environ[name] for name in _ENVIRONMENT if name in environ}
