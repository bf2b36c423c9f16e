"""`python -m offline embed SOURCE... -o OUT_DIR` (see offline/cli.py)."""

import sys

from offline.cli import main

if __name__ == "__main__":
    sys.exit(main())
