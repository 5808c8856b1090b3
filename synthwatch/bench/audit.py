"""Which published events a benchmark phase's worker did not store, and where they sit in Kafka.

Why: a pipeline benchmark run under load (``--changes poll-4096``, 22 watchdog seek-backs) stored 163
events fewer than it published, the worker idle and ready, and its directory was deleted with the run,
so nobody could tell a loss (offsets committed past the events) from a stall (never committed) or a
counting error. With ``--keep DIR`` the benchmark keeps its directories and writes this audit of the
RSS phase: the missing event ids, their topic, partition and offset, and the group's committed offsets
beside the high watermarks, read while the (in-memory) broker still holds them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from synthwatch.stack.broker import committed_offsets
from synthwatch.stream_apps.storage.query import QueryResult

Query = Callable[[str, dict[str, Any] | None], QueryResult]

#: ids of ``PREFIX-0`` .. ``PREFIX-(count-1)`` found in neither input table (at most ``limit`` of them)
_MISSING_SQL = (
    "SELECT number FROM numbers({count:UInt64}) "
    "WHERE concat({prefix:String}, toString(number)) NOT IN ("
    "SELECT event_id FROM lab_detections WHERE startsWith(event_id, {prefix:String}) "
    "UNION ALL SELECT event_id FROM border_seizures WHERE startsWith(event_id, {prefix:String})) "
    "ORDER BY number LIMIT {limit:UInt64}"
)
_STORED_SQL = (
    "SELECT count(), uniqExact(event_id) FROM ("
    "SELECT event_id FROM lab_detections WHERE startsWith(event_id, {prefix:String}) "
    "UNION ALL SELECT event_id FROM border_seizures WHERE startsWith(event_id, {prefix:String}))"
)


def missing_indices(query: Query, prefix: str, count: int, limit: int = 100_000) -> list[int]:
    """Indices ``i`` in ``[0, count)`` whose event ``{prefix}{i}`` is in neither input table."""
    result = query(_MISSING_SQL, {"count": count, "prefix": prefix, "limit": limit})
    return [int(row[0]) for row in result.rows]


def locate(
    servers: str, topics: Sequence[str], wanted: Iterable[str], timeout: float = 600.0
) -> dict[str, dict[str, Any]]:
    """Where each event id of ``wanted`` was published: topic, partition, offset, broker timestamp (ms).

    Reads ``topics`` from their beginning to their high watermarks (a whole phase's topics: slow, so only for
    the events already known missing); an id published twice keeps its first place. Ids not found are absent.
    """
    from kafka import KafkaConsumer

    from synthwatch.stack.broker import high_watermarks

    want = set(wanted)
    found: dict[str, dict[str, Any]] = {}
    if not want:
        return found
    marks = {tp: mark for tp, mark in high_watermarks(servers, topics).items() if mark > 0}
    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, max_poll_records=5000)
    try:
        consumer.assign(list(marks))
        consumer.seek_to_beginning(*marks)
        deadline = time.monotonic() + timeout
        left = dict(marks)
        while left and len(found) < len(want) and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    event_id = _event_id(record.value)
                    if event_id in want and event_id not in found:
                        found[event_id] = {
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "offset": record.offset,
                            "timestamp_ms": record.timestamp,
                        }
                    if record.offset + 1 >= marks[tp]:
                        left.pop(tp, None)
    finally:
        consumer.close(autocommit=False)
    return found


def _event_id(value: bytes | None) -> str | None:
    try:
        event_id = json.loads(value or b"null").get("event_id")
    except (ValueError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) else None


def group_offsets(servers: str, group: str, topics: Sequence[str]) -> list[dict[str, Any]]:
    """Per partition: the group's committed offset (-1: none) and the high watermark."""
    return [
        {"topic": tp.topic, "partition": tp.partition, "committed": committed, "high_watermark": mark}
        for tp, (committed, mark) in sorted(
            committed_offsets(servers, group, topics).items(), key=lambda kv: (kv[0].topic, kv[0].partition)
        )
    ]


def audit_phase(
    query: Query,
    servers: str,
    group: str,
    topics: Sequence[str],
    prefix: str,
    count: int,
    out: Path,
) -> dict[str, Any]:
    """Stored vs published for the events ``{prefix}0`` .. ``{prefix}(count-1)`` of one phase; writes ``out``.

    ``count`` is what the phase generated; an index missing from both tables is located in Kafka and shown
    beside its partition's committed offset: committed past it is a loss, not committed up to it a stall.
    """
    offsets = group_offsets(servers, group, topics)
    rows, distinct = (int(x) for x in query(_STORED_SQL, {"prefix": prefix}).rows[0])
    missing = missing_indices(query, prefix, count)
    places = locate(servers, topics, [f"{prefix}{i}" for i in missing]) if missing else {}
    committed = {(o["topic"], o["partition"]): o["committed"] for o in offsets}
    events = []
    for i in missing:
        place = places.get(f"{prefix}{i}")
        entry: dict[str, Any] = {"event_id": f"{prefix}{i}", "index": i}
        if place is not None:
            done = committed.get((place["topic"], place["partition"]), -1)
            entry.update(place, committed_past=done > place["offset"])
        events.append(entry)
    report = {
        "group": group,
        "prefix": prefix,
        "generated": count,
        "stored_rows": rows,
        "stored_distinct": distinct,
        "missing": len(missing),
        "missing_not_in_kafka": sum(1 for e in events if "offset" not in e),
        "missing_committed_past": sum(1 for e in events if e.get("committed_past")),
        "offsets": offsets,
        "events": events,
    }
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
