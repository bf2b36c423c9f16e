"""`python -m server`: run the DINOv2 embedding gRPC server."""

from __future__ import annotations

import asyncio
import os
import sys

from server.config import load_settings
from server.errors import ModelLoadError, StartupError
from server.logs import configure_logging
from server.source import check_supported, locate


def main() -> int:
    settings = load_settings(sys.argv[1:], os.environ)
    configure_logging(settings.log_level, settings.log_format)
    try:
        # A model that cannot be loaded or served ends the start before torch and grpc are imported.
        check_supported(locate(settings.model, settings.revision, settings.hub_timeout_s))
        from server.app import serve

        asyncio.run(serve(settings))
    except (ModelLoadError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
