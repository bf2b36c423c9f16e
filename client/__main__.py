"""`python -m client ...`: see client/cli.py. SIGTERM stops a job as Ctrl-C does: what is done is kept."""

import signal
import sys

from client.cli import main


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
