"""The count of what a stop left unstored: the lag, less what the worker stored and could not commit."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from faust.types import TP
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, lag_by_topic, unstored
from synthwatch.stream_apps.runtime.transport import note_stored, rows_being_stored, stored_uncommitted


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


def test_rows_a_thread_wrote_count_as_stored_though_their_coroutine_never_noted_them() -> None:
    """A stop cancels the coroutine that waits for a checkpoint's write, not the write: the writing thread's
    own mark is what the count has then."""
    consumer = SimpleNamespace(stored={}, writes=[])
    lab, seizures = TP("lab", 0), TP("seizures", 1)
    abandoned = rows_being_stored(consumer, [SimpleNamespace(tp=lab, offset=o) for o in (7, 8)])
    unfinished = rows_being_stored(consumer, [SimpleNamespace(tp=seizures, offset=3)])
    assert stored_uncommitted(consumer) == {}  # neither write has ended
    abandoned.done()  # in the thread, once the rows are in ClickHouse
    assert stored_uncommitted(consumer) == {("lab", 0): frozenset({7, 8})}
    # The other write's coroutine got to note it: the same offsets once, the thread's record dropped.
    unfinished.done()
    note_stored(consumer, unfinished.messages, unfinished)
    assert consumer.writes == [abandoned]
    assert stored_uncommitted(consumer) == {("lab", 0): frozenset({7, 8}), ("seizures", 1): frozenset({3})}
    rows_being_stored(SimpleNamespace(), []).done()  # a consumer that does not note: nothing kept, nothing fails


def test_a_count_against_a_frozen_broker_gives_up_after_its_own_timeout(tmp_path: Path) -> None:
    """A stopping `up` counts what is left every 0.25 s while it drains, and once more after: against a
    frozen broker each count must give up after the timeout it was given, not after kafka-python's 30 s
    wait for its first connection (which held every stop-with-a-frozen-broker for half a minute)."""
    broker = EmbeddedBroker(Settings(data_dir=tmp_path / "data", web_port=0)).start()
    assert broker.process is not None
    try:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send("frozen-count", b"x").get(timeout=10)
        producer.close()
        assert lag_by_topic(broker.bootstrap_servers, "g", ["frozen-count"], 5.0) == {"frozen-count": 1}
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(KafkaTimeoutError):
                lag_by_topic(broker.bootstrap_servers, "g", ["frozen-count"], 1.0)
            waited = time.monotonic() - started
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        assert waited < 15, f"waited {waited:.1f} s for a count given 1 s"  # kafka-python's own wait: 30 s
    finally:
        broker.stop()
