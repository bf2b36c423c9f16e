"""`python -m server` whose forward passes the test can hold: `python -m tests.held_server ARGS...`.

A test in another process cannot reach `ControlledRunner.allow`, so this one
takes its orders on stdin. The line `hold` makes every later forward pass wait
in the model; each such pass first prints `held: a batch waits in the model`.
Closing stdin lets them all go. The start's own passes (warm-up, timing) run
before any `hold`, and the health probe calls the real runner, never held.
Everything else is the server as `python -m server` runs it: its signal
handlers, its drain, its exit status.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from server.__main__ import main
from server.model import ModelRunner

HELD = "held: a batch waits in the model"
ARMED = "held: armed"

_holding = threading.Event()
_released = threading.Event()


class HeldRunner:
    """The real runner, whose `embed` waits while held (see the module's docstring)."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        if _holding.is_set() and not _released.is_set():
            print(HELD, flush=True)
            _released.wait()
        return self._runner.embed(*args, **kwargs)


def _take_orders() -> None:
    for line in sys.stdin:
        if line.strip() == "hold":
            _holding.set()
            print(ARMED, flush=True)
    _released.set()  # stdin closed: by the test, or because it died


def run() -> int:
    real_load = ModelRunner.load

    def load(settings: Any, *args: Any, **kwargs: Any) -> HeldRunner:
        return HeldRunner(real_load(settings, *args, **kwargs))

    ModelRunner.load = load  # type: ignore[method-assign,assignment]  # what server.app.serve calls
    threading.Thread(target=_take_orders, name="held-server-orders", daemon=True).start()
    return main()


if __name__ == "__main__":
    sys.exit(run())
