"""Processes as /proc shows them, for tests that must see children end (Linux only)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie left for its parent or init to reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(pids: list[int], within_s: float) -> bool:
    """Whether every process of `pids` is gone within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if not gone(p)]
        if pids:
            time.sleep(0.05)
    return not [p for p in pids if not gone(p)]


def children(pid: int) -> list[int]:
    return _processes_with(1, pid)  # field 1 after the name in /proc/<pid>/stat: the parent


def session_members(sid: int) -> list[int]:
    return _processes_with(4, sid)  # field 4: the session


def ray_children(pid: int) -> list[int]:
    """Processes whose parent is `pid` and whose command line names ray."""
    found = []
    for child in children(pid):
        try:
            if b"ray" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found


def end_forked_copies() -> None:
    """Kills children of this process that are still copies of it (forked, never exec'd)."""
    own = Path("/proc/self/cmdline").read_bytes()
    for pid in children(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == own:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def kill_session(sid: int) -> None:
    """Ends what is left in session `sid` (a session the test started), after 10 s to end on its own."""
    if wait_gone(session_members(sid), within_s=10):
        return
    left = [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in session_members(sid) if Path(f"/proc/{p}").exists()]
    print(f"left behind in session {sid}, now killed: {left}")
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(session_members(sid), within_s=10)


def _processes_with(stat_field: int, value: int) -> list[int]:
    """The processes whose /proc/<pid>/stat field (counted after the command name) equals value."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[stat_field]) == value:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found
