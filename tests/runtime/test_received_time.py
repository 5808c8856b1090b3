"""The intake agent's receipt time of a record: its Kafka timestamp (what bounds the record's event time)."""

from __future__ import annotations

from datetime import UTC, datetime

from synthwatch.stream_apps.runtime.agents.intake import received_time


def test_a_kafka_timestamp_is_the_receipt_time() -> None:
    assert received_time(1_796_212_800.0) == datetime(2026, 12, 2, 12, tzinfo=UTC)
    assert received_time(None) is None and received_time(-1) is None  # Kafka's "no timestamp"
    assert received_time(1e300) is None  # beyond any datetime: no bound rather than a crash
