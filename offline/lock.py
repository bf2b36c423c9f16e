"""One run at a time per OUT_DIR: a lock file naming the run, checked by every write before it commits.

A second run on the same OUT_DIR (with `--overwrite` or not) would clear or
extend rows that the first one is still writing with its own settings. The
driver takes OUT_DIR/lock.json before it reads or writes anything there:

- on a local (or mounted) folder the file is held with `flock`, which the
  kernel releases when the driver dies however it dies: a stale lock is
  simply one nobody holds;
- on an object store, where nothing can hold a file, the file is a lease: the
  driver rewrites it every `HEARTBEAT_S` and removes it when it ends, and a
  lease not renewed for `STALE_S` belongs to a driver that is gone.

Each write task compares the lock's run token with its own before renaming a
part into place, so the stray tasks of a run that lost the lock add nothing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import IO

from offline.store import LOCK, Store

try:
    import fcntl
except ImportError:  # not POSIX: no flock; the lease rules apply
    fcntl = None  # type: ignore[assignment]

HEARTBEAT_S = 30.0
STALE_S = 300.0


class Locked(RuntimeError):
    """Another run holds OUT_DIR."""


class LockLost(RuntimeError):
    """This run's lock was taken over: its writes must stop."""


class OutLock:
    """The lock of one run on one OUT_DIR; `acquire` raises `Locked` with who holds it."""

    def __init__(self, store: Store, lease: bool | None = None) -> None:
        self.store = store
        self.lease = (not store.local) if lease is None else lease
        self.token = uuid.uuid4().hex
        self._file: IO[str] | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self) -> dict[str, object]:
        return {"run": self.token, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}

    def acquire(self) -> None:
        if self.lease:
            self._take_lease()
        else:
            self._take_flock()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            try:
                check_token(self.store, self.token)
            except LockLost:
                return  # taken over after going stale: the file is the new holder's
            self.store.fs.delete_file(self.store.path(LOCK))
        if self._file is not None:
            self._file.close()  # releases the flock; the file stays (deleting it would race a new holder)
            self._file = None

    def __enter__(self) -> OutLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _take_flock(self) -> None:
        path = self.store.path(LOCK)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read()
                handle.close()
                raise Locked(_held_message(self.store.out, holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self._record()))
        handle.flush()
        self._file = handle

    def _take_lease(self) -> None:
        text = self.store.read_text(LOCK)
        if text:
            try:
                renewed = float(json.loads(text).get("renewed", 0))
            except (ValueError, AttributeError, TypeError):
                renewed = 0.0
            if time.time() - renewed < STALE_S:
                raise Locked(_held_message(self.store.out, text, f"; a lease not renewed for {STALE_S:.0f} s is stale"))
        self._write_lease()
        self._heartbeat = threading.Thread(target=self._renew, name="offline-lock", daemon=True)
        self._heartbeat.start()

    def _write_lease(self) -> None:
        self.store.write_atomic(LOCK, json.dumps(self._record()).encode("utf-8"))

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write_lease()


def check_token(store: Store, token: str) -> None:
    """Raises `LockLost` unless OUT_DIR's lock still names the run `token` (called before a part commits)."""
    text = store.read_text(LOCK) or "{}"
    try:
        holder = json.loads(text).get("run")
    except (ValueError, AttributeError):
        holder = None
    if holder != token:
        raise LockLost(f"another run took {store.out} over (its lock names run {holder!r}); this run's write stops")


def _held_message(out: str, holder_text: str, extra: str = "") -> str:
    try:
        holder = json.loads(holder_text)
        who = f"run {holder['run'][:8]} of process {holder['pid']} on {holder['host']}"
    except (ValueError, KeyError, TypeError):
        who = "another run"
    return f"{out} is in use by {who}: wait for it to end, or write to another folder{extra}"
