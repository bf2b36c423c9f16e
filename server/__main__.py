"""`python -m server`: run the DINOv2 embedding gRPC server."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from server.app import serve
from server.config import load_settings
from server.errors import ModelLoadError


def main() -> int:
    settings = load_settings(sys.argv[1:], os.environ)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
