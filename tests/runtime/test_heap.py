"""The worker's heap trimmer (stream_apps/runtime/heap.py): glibc's malloc_trim, every few seconds, in a thread."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest

from synthwatch.bench.memory import process_memory
from synthwatch.stream_apps.runtime import heap
from synthwatch.stream_apps.runtime.heap import HeapTrimmer, malloc_trim, start_heap_trimmer
from synthwatch.stream_apps.runtime.metrics import WorkerMetrics


def test_the_trimmer_calls_trim_in_its_own_thread_and_reports_each_call() -> None:
    calls: list[tuple[int, str]] = []
    reported: list[float] = []
    three = threading.Event()

    def trim(pad: int) -> int:
        calls.append((pad, threading.current_thread().name))
        if len(calls) >= 3:
            three.set()
        return 1

    trimmer = HeapTrimmer(0.001, trim, reported.append).start()
    assert three.wait(10)
    trimmer.stop()
    n = len(calls)
    time.sleep(0.01)
    assert len(calls) == n  # stopped: no call after stop() returned
    assert set(calls) == {(0, "heap-trim")}
    assert trimmer.trims == n == len(reported)
    assert trimmer.busy_seconds == pytest.approx(sum(reported))


def test_no_trimmer_when_switched_off() -> None:
    assert start_heap_trimmer(0) is None


def test_one_trimmer_per_process_reporting_to_the_latest_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_running", None)
    monkeypatch.setattr(heap, "malloc_trim", lambda: lambda pad: 0)
    first, second = WorkerMetrics(), WorkerMetrics()
    trimmer = start_heap_trimmer(3600, first.heap_trimmed)
    try:
        assert trimmer is not None and start_heap_trimmer(3600, second.heap_trimmed) is trimmer
        trimmer.trim_now()
        assert (first.stats.heap_trims, second.stats.heap_trims) == (0, 1)
        assert second.stats.heap_trim_seconds >= 0
    finally:
        assert trimmer is not None
        trimmer.stop()


def test_nothing_starts_where_libc_has_no_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_running", None)
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda name: None)
    assert malloc_trim() is None
    assert start_heap_trimmer(5) is None


@pytest.mark.skipif(malloc_trim() is None, reason="glibc only")
def test_malloc_trim_gives_freed_heap_pages_back() -> None:
    """Blocks freed between blocks still in use stay resident until trimmed: glibc returns memory by itself
    only from the top of a heap (64 KiB blocks: under its mmap threshold, over its caches' sizes)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    trim = malloc_trim()
    assert trim is not None
    size = 64 * 1024
    blocks = [libc.malloc(size) for _ in range(1600)]  # 100 MiB
    for block in blocks:
        libc.memset(block, 1, size)  # resident
    for block in blocks[::2]:
        libc.free(block)  # 50 MiB freed in holes between kept blocks
    before = process_memory()["RssAnon"]
    assert trim(0) == 1
    after = process_memory()["RssAnon"]
    for block in blocks[1::2]:
        libc.free(block)
    assert before - after > 40 * 1024  # KiB: the holes' pages (all but each block's first) went back
