"""The count of what a stop left unstored: the lag, less what the worker stored and could not commit."""

from __future__ import annotations

from types import SimpleNamespace

from faust.types import TP

from synthwatch.stack.broker import unstored
from synthwatch.stream_apps.runtime.transport import note_stored, stored_uncommitted


def test_records_stored_above_the_committed_offset_are_not_counted() -> None:
    assert unstored(5, 10, {5, 7}) == 3  # 6, 8 and 9
    assert unstored(-1, 4, {0, 1}) == 2  # never committed: from the start
    assert unstored(5, 10, {2, 4, 10, 11}) == 5  # below the commit or past the end: nothing to take off
    assert unstored(10, 10, set()) == 0
    assert unstored(5, 10, ()) == 5  # unknown to the worker (none stored): the whole lag


def test_what_the_consumer_noted_as_stored_is_reported_per_partition() -> None:
    consumer = SimpleNamespace(stored={})
    tp = TP("lab", 2)
    note_stored(consumer, [SimpleNamespace(tp=tp, offset=o) for o in (4, 5, 5)])
    assert stored_uncommitted(consumer) == {("lab", 2): frozenset({4, 5})}
    note_stored(SimpleNamespace(), [SimpleNamespace(tp=tp, offset=1)])  # a consumer that does not note: ignored
