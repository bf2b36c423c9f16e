"""Fetches a model and its image processor into a local folder, for baking into an image.

The container runs this at build time, so a worker never downloads at start:

    python -m server.download --model facebook/dinov2-small --out /opt/model

It loads with the same `from_pretrained` calls the server uses and saves the
result, so the folder is exactly what the server will load offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.errors import ModelLoadError
from server.source import check_supported, locate


def download(model: str, out: Path, revision: str | None = None, hub_timeout_s: float = 10.0) -> Path:
    """Writes config, weights and the (unmodified) processor config of `model` to `out`.

    A model the server would refuse (not reachable, not DINOv2) is refused here, at build time.
    """
    from transformers import AutoImageProcessor, AutoModel

    source = locate(model, revision, hub_timeout_s)
    check_supported(source)
    try:
        processor = AutoImageProcessor.from_pretrained(source.model, **source.kwargs())
        network = AutoModel.from_pretrained(source.model, **source.kwargs())
    except OSError as exc:
        raise ModelLoadError.cannot_load(model, exc) from None
    out.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch a DINOv2 model into a local folder.")
    parser.add_argument("--model", required=True, help="Hub id or local folder")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    args = parser.parse_args(argv)
    try:
        path = download(args.model, args.out, args.revision)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"saved {args.model} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
