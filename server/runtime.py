"""Process-level settings that decide how fast the server runs: one compute thread, no page faults, short GCs.

Three effects (the first two each worth 20-40% on the 2-core development machine):

- OpenMP thread pools. libgomp (PyTorch's OpenMP) keeps one pool of worker
  threads per thread that ever ran a parallel op. Once all pools together hold
  more threads than there are CPUs, every pool stops spinning between
  parallel regions and sleeps instead, and each of the hundreds of ops of a
  forward pass pays a wake-up. `ComputeThread` runs all of the model's work
  (load, warm-up, forward passes) on one thread of its own, whichever thread
  asks, and every model of a process shares `shared_compute_thread()`, so
  the process has one pool. Other PyTorch work in the process (a benchmark's
  reference model, say) should run there too: `shared_compute_thread().run(fn)`.
- Page faults. glibc returns freed blocks of more than a few MB to the
  kernel, so each forward pass maps its activations afresh and the kernel
  zero-fills them (about 86,000 faults per batch of 8 for dinov2-small).
  `tune_malloc` keeps blocks up to 32 MB in the heap instead.

- Garbage collection. Importing PyTorch, transformers and gRPC leaves some
  350,000 objects that live as long as the process, and every full collection
  walks them all (about 160 ms of the event loop each; under a stream of
  512x512 JPEGs, Python ran one every few seconds). `freeze_startup_objects`
  takes them out of the collector's sight once the model is loaded.

`MemoryPolicy` decides when the heap that `tune_malloc` keeps goes back to
the kernel: when load falls, not only when the server is idle.

`name_os_thread` gives the compute and decode threads names the OS shows
(`top -H`, /proc, profilers; the host-path benchmark splits CPU time by them).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
_PR_SET_NAME = 15
_TRIM_BELOW = 0.25  # of the peak bytes in flight: load has fallen, trim soon
_KEEP_ABOVE = 0.5  # of the peak: load is back, keep the freed blocks
_LAST_TRIM_AFTER_S = 60.0
_tuned = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def tune_malloc() -> bool:
    """Keeps freed blocks below 32 MB in the heap (glibc only; elsewhere a no-op). True when applied.

    The process keeps its peak working set rather than returning it to the
    kernel between forward passes; its peak (VmHWM) does not change.
    """
    global _tuned
    if _tuned:
        return True
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    log.debug("malloc tuned: %s", _tuned)
    return _tuned


def release_memory() -> bool:
    """Returns the heap's free pages to the kernel (glibc `malloc_trim`); True when some were.

    `tune_malloc` keeps freed blocks for the next forward pass; after a spike
    of load that would keep the spike's peak for good, so `MemoryPolicy`
    calls this once the load has fallen for a moment.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


class MemoryPolicy:
    """When the service gives freed memory back to the kernel: once load falls, not only at idle.

    A trim (a full collection, then `release_memory` off the loop) comes
    `idle_trim_s` after the bytes in flight fall to a quarter of their peak,
    and again after 4x and 16x as long (up to `_LAST_TRIM_AFTER_S`) while they
    stay at most half of it: a burst's memory goes back while light requests
    still flow (a single trim 1 s after a burst of 8 MB PNGs left 1.7 GB,
    which a later one freed). Load rising past half its peak cancels the
    pending trim, so steady load keeps its freed blocks. After the last trim
    the peak starts over from the load of the moment.

    The service reports each request's body (`received`) and every change in
    the bytes in flight (`in_flight`); `loop` is by default the running one.
    """

    def __init__(
        self, idle_trim_s: float, collect_every_bytes: int, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.idle_trim_s = idle_trim_s
        self.collect_every_bytes = collect_every_bytes
        self._loop = loop
        self._received = 0
        self._in_flight = 0
        self._peak = 0
        self._used = False  # work came since the last trim
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def received(self, nbytes: int) -> None:
        """A request's body was read (admitted or not); a full collection per `collect_every_bytes` of them.

        gRPC's per-call objects form reference cycles that keep the call's
        received body alive; calls that last seconds reach the oldest
        generation, which Python collects only rarely, so under a stream of
        large requests memory would grow by the request size per call.
        """
        self._used = True
        self._received += nbytes
        if self._received >= self.collect_every_bytes:
            self._received = 0
            self._release()
        self._follow_load()

    def in_flight(self, nbytes: int) -> None:
        """The bytes of work accepted and not yet answered, on every change."""
        self._in_flight = nbytes
        self._peak = max(self._peak, nbytes)
        self._used = self._used or nbytes > 0
        self._follow_load()

    def close(self) -> None:
        self._closed = True
        self._cancel()

    def _follow_load(self) -> None:
        if self._closed:
            return
        if self._in_flight > self._peak * _KEEP_ABOVE:
            self._cancel()
        elif self._timer is None and self._used and self._in_flight <= self._peak * _TRIM_BELOW:
            self._timer = self._running_loop().call_later(self.idle_trim_s, self._trim, self.idle_trim_s)

    def _trim(self, waited_s: float) -> None:
        self._timer = None
        self._used = False
        log.debug("memory trim: %d bytes in flight, peak %d", self._in_flight, self._peak)
        self._release()
        if 0 < waited_s * 4 <= _LAST_TRIM_AFTER_S:
            self._timer = self._running_loop().call_later(waited_s * 4, self._trim, waited_s * 4)
        else:
            self._peak = self._in_flight

    def _release(self) -> None:
        gc.collect()
        self._running_loop().run_in_executor(None, release_memory)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop or asyncio.get_running_loop()


def freeze_startup_objects() -> int:
    """Moves every object alive now out of the garbage collector's sight; returns how many.

    For a process's entry point, once the model is loaded and before it serves: later
    collections (Python's own, and the service's after large requests) then
    walk only what was made since. What is frozen is still freed by reference
    counting; only reference cycles among these objects would stay.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def name_os_thread(name: str) -> None:
    """Names the calling thread for the OS as well (Linux, 15 bytes): `top -H`, /proc and profilers
    then tell the compute and decode threads apart (Python's thread names stay in Python)."""
    prctl = getattr(_libc(), "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def _named_ident(name: str) -> int:
    name_os_thread(name)
    return threading.get_ident()


class ComputeThread:
    """One thread that runs every PyTorch call of a model; `run(fn, ...)` from any thread waits for it."""

    def __init__(self, name: str = "torch") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = self._executor.submit(_named_ident, f"{name}-compute").result()

    def run(self, fn: Callable[..., T], *args: object) -> T:
        if threading.get_ident() == self._ident:
            return fn(*args)
        return self._executor.submit(fn, *args).result()

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Queues `fn(*args)` on the compute thread without waiting (the batcher awaits the future)."""
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


def shared_compute_thread() -> ComputeThread:
    """The process's default compute thread, made on first use: every model in a process shares it."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
