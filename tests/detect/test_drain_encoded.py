"""The intake checkpoint drains detector state encoded (``RegionDetector.drain_dirty(encode=...)``).

Why: a checkpoint at 1,000 events/s drains 1,000-1,500 records, each a tree of small lists and dicts. Built all at
once and held until the changelog write encoded them, they were tens of thousands of live containers that set off a
young collection (30-50 ms) in the drain itself, and every alert on its way waited for it (docs/performance.md,
"The alert tail, per alert"). Encoded as each is built, each tree is freed at once: the collector's young
generation does not grow by them.
"""

from __future__ import annotations

import gc
from datetime import timedelta

from pydantic_core import to_json

from synthwatch.bench.state import stream
from synthwatch.stream_apps.detect.region import RegionDetector


def _detector(events: int) -> RegionDetector:
    detector = RegionDetector()
    for obs in stream(20, 25, timedelta(minutes=30), events):
        detector.observe(obs, emit=False)
    return detector


def test_encoded_drain_gives_the_records_bytes_in_the_same_order() -> None:
    plain, encoded = _detector(3000), _detector(3000)
    expected = [(region, key, to_json(value)) for region, key, value in plain.drain_dirty()]
    assert expected  # 500 series and 20 regions changed
    assert encoded.drain_dirty(encode=to_json) == expected
    assert encoded.drain_dirty(encode=to_json) == []  # drained: nothing dirty is left


def test_encoded_drain_leaves_no_record_trees_for_the_collector() -> None:
    detector = _detector(3000)
    n = len(detector.dirty_series) + len(detector.dirty_regions)
    gc.collect()
    gc.disable()  # the young generation's count (tracked containers allocated, less those freed) is read, not reset
    try:
        before = gc.get_count()[0]
        drained = detector.drain_dirty(encode=to_json)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(drained) == n
    # at most one (region, key, bytes) tuple per record is left; the plain drain left 10,362 containers for these
    # 640 records (their lists and dicts, ~16 each)
    assert grown <= n + 5, f"{grown} containers left for {n} records"
