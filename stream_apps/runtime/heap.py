"""Freed heap pages go back to the kernel every few seconds (glibc's ``malloc_trim``), from a thread.

Why: glibc returns freed memory to the kernel only from the top of a heap. The worker frees a lot in the
middle of its heaps (Kafka fetch buffers, state records replaced at every checkpoint, each batch's
events), so after a backlog its RSS stayed at the high-water mark: measured after 300,000 keyed events,
glibc held 281 MiB of which 179 MiB were free, and one ``malloc_trim(0)`` took RSS from 1,061 to 904 MiB
(docs/performance.md, issue 16). The pages are given back with ``MADV_DONTNEED``; a later allocation
there gets fresh zero pages, so nothing the process holds changes.

The call runs in a thread of its own: ctypes releases the GIL for it, so the event loop is not held; an
allocation in the arena being trimmed waits for that arena only. Elsewhere than glibc (musl, macOS) there
is no such call and nothing is started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("synthwatch.stack.worker")


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim(pad)`` (returns 1 if memory was released), or None where libc has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


@dataclass
class HeapTrimmer:
    """Calls ``trim(0)`` every ``seconds`` in a daemon thread until :meth:`stop`; counts calls and time.

    ``on_trim(seconds)`` is told how long each call took (the worker's ``/ready`` counters).
    """

    seconds: float
    trim: Callable[[int], int]
    on_trim: Callable[[float], None] | None = None
    trims: int = 0
    busy_seconds: float = 0.0  # time spent inside trim, in all
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> HeapTrimmer:
        self._thread = threading.Thread(target=self._run, name="heap-trim", daemon=True)
        self._thread.start()
        return self

    def trim_now(self) -> None:
        started = time.perf_counter()
        self.trim(0)
        took = time.perf_counter() - started
        self.busy_seconds += took
        self.trims += 1
        if self.on_trim is not None:
            self.on_trim(took)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            self.trim_now()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


_running: HeapTrimmer | None = None
_lock = threading.Lock()


def start_heap_trimmer(seconds: float, on_trim: Callable[[float], None] | None = None) -> HeapTrimmer | None:
    """The process's trimmer, started on first call (one per process: the heap is the process's; a later
    call gets the running one, ``on_trim`` now its); None when ``seconds`` is 0 or libc has no ``malloc_trim``."""
    global _running
    if seconds <= 0:
        return None
    with _lock:
        if _running is None:
            trim = malloc_trim()
            if trim is None:
                log.info("no malloc_trim in this C library: freed heap pages are left to the allocator")
                return None
            _running = HeapTrimmer(seconds, trim, on_trim).start()
        _running.on_trim = on_trim
        return _running
