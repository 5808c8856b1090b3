"""The collector's settings once the worker is ready (``freeze_long_lived_objects``, ``SYNTHWATCH_GC_THRESHOLDS``).

Why they matter: every collection holds the event loop, and so every agent, while it walks; its thresholds set how
long (docs/performance.md, "garbage collector").
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
from pydantic import ValidationError

from synthwatch.settings import Settings
from synthwatch.stream_apps.runtime.recovery import freeze_long_lived_objects


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_ready_collects_freezes_and_sets_the_thresholds_it_is_given() -> None:
    before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    garbage = _Cycle()
    collected = threading.Event()
    weakref.finalize(garbage, collected.set)
    del garbage
    try:
        freeze_long_lived_objects((12_345, 6, 78))
        assert collected.is_set(), "what start-up left was not collected"
        assert gc.get_freeze_count() > frozen_before
        assert gc.get_threshold() == (12_345, 6, 78)
    finally:
        gc.unfreeze()  # this test session's objects go back to the collector
        gc.set_threshold(*before)


def test_thresholds_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTHWATCH_GC_THRESHOLDS", "[20000, 5, 100]")
    assert Settings().gc_thresholds == (20_000, 5, 100)
    # 0 as the first would switch automatic collection off (cyclic garbage never freed): refused, as are others
    for bad in ("[0, 10, 10]", "[1000, -1, 10]", "[1000, 10]"):
        monkeypatch.setenv("SYNTHWATCH_GC_THRESHOLDS", bad)
        with pytest.raises(ValidationError, match="gc_thresholds"):
            Settings()


def test_collections_once_ready_are_counted_and_timed_per_generation() -> None:
    from prometheus_client import generate_latest

    from synthwatch.stream_apps.runtime.metrics import WorkerMetrics, _on_collection

    metrics = WorkerMetrics()
    assert metrics.stats.gc_collections == [0, 0, 0]
    metrics.watch_collections()
    try:
        gc.collect(0)
        gc.collect(2)
        assert metrics.stats.gc_collections == [1, 0, 1]
        assert metrics.stats.gc_seconds[2] > 0 and metrics.stats.gc_longest_seconds >= metrics.stats.gc_seconds[0]
        text = generate_latest(metrics.registry).decode()
        assert 'synthwatch_gc_pause_seconds_count{generation="2"} 1.0' in text
        assert 'synthwatch_gc_pause_seconds_count{generation="1"} 0.0' in text
        later = WorkerMetrics()  # another worker in this process takes the one hook over
        later.watch_collections()
        gc.collect(1)
        assert gc.callbacks.count(_on_collection) == 1
        assert (metrics.stats.gc_collections, later.stats.gc_collections) == ([1, 0, 1], [0, 1, 0])
    finally:
        gc.callbacks.remove(_on_collection)
