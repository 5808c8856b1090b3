"""The intake agent's receipt time of a record: its Kafka timestamp (what bounds the record's event time), never
after the worker's clock: the timestamp is the producer's to set (CreateTime), so it bounds nothing by itself."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from synthwatch.schemas.reject_reasons import reject_reason
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.runtime.agents.intake import Receipts, received_time
from tests.support.factories import seizure

NOW = 1_796_212_800.0  # 2026-12-02 12:00 UTC, the worker's clock
AT_NOW = datetime(2026, 12, 2, 12, tzinfo=UTC)


def test_a_kafka_timestamp_is_the_receipt_time() -> None:
    assert received_time(NOW - 3600, NOW) == datetime(2026, 12, 2, 11, tzinfo=UTC)
    assert received_time(NOW, NOW) == AT_NOW


def test_a_forged_or_missing_timestamp_is_bounded_by_the_workers_clock() -> None:
    # A producer sets CreateTime: 2099, -1 (Kafka's "none"), 0, past any datetime, not a number. Each was "no
    # bound" or a bound in 2099 before: a report dated 2099 sent with one of them moved every watermark.
    for forged in (4_083_264_000.0, None, -1.0, -0.001, 0.0, 1e300, 9.2e15, float("inf"), float("nan")):
        assert received_time(forged, NOW) == AT_NOW, forged
    assert received_time(NOW + 0.0009, NOW + 0.0009) == AT_NOW, "to the ms, as ingested_at (DateTime64(3))"


def test_one_batchs_receipts_are_each_records_own() -> None:
    # The agent builds one datetime per distinct millisecond of a batch (``Receipts``): a record with another
    # timestamp after one of the same millisecond, a forged one between two honest ones, and back again.
    stamps = [
        NOW - 3600,
        NOW - 3600,
        NOW - 3600.0004,
        NOW - 3599.999,
        None,
        NOW - 3599.999,
        4_083_264_000.0,
        NOW - 5,
        float("nan"),
        NOW - 3600,
        -1.0,
        NOW,
    ]
    receipt = Receipts(NOW)
    assert [receipt(t) for t in stamps] == [received_time(t, NOW) for t in stamps]
    assert receipt(NOW - 3599.999) == datetime(2026, 12, 2, 11, 0, 0, 1000, tzinfo=UTC)


def test_a_report_dated_2099_with_a_kafka_timestamp_of_2099_is_refused() -> None:
    future = json.dumps(seizure(event_id="sz-2099", occurred_at="2099-06-01T10:00:00+00:00"))
    for forged in (4_083_264_000.0, -1.0, 1e300):
        result = Intake().process([RawMessage("t:0:1", future, received_at=received_time(forged, NOW))])
        assert not result.events and [r.event_id for r in result.rejects] == ["sz-2099"], forged
        assert reject_reason(result.rejects[0].reason) == "future_occurred_at"
        assert "after the report was received (2026-12-02T12:00:00+00:00)" in result.rejects[0].reason
