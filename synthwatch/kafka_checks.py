"""What a Kafka cluster holds, read from outside a worker: topic contents, ends, a group's committed offsets.

Shared by the reliability tests and the crash benchmark (:mod:`synthwatch.bench_crash`): "done" means
the group has committed every partition's end, not merely that rows look complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any


def read_all(servers: str, topics: Iterable[str], idle: float = 2.0, timeout: float = 60.0) -> list[bytes]:
    """Every record value in ``topics``: read from the beginning until nothing new comes for ``idle`` s."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or set())]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        values: list[bytes] = []
        deadline, quiet_since = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() - quiet_since < idle and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                values += [r.value for r in records]
                quiet_since = time.monotonic()
        return values
    finally:
        consumer.close(autocommit=False)


def high_watermarks(servers: str, topics: Iterable[str], timeout: float = 20.0) -> dict[Any, int]:
    """Per partition, the offset after the last record, as fetch responses report it.

    Not ListOffsets: Tansu 0.6 answers "latest" with the first offset of the last record batch, so a
    lag computed from it looks zero (or negative) while the last batch is still unread.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or set())]
        consumer.assign(partitions)
        for tp, offset in consumer.end_offsets(partitions).items():
            consumer.seek(tp, offset)  # at or before the end: one fetch tells the high watermark
        marks: dict[Any, int] = {}
        deadline = time.monotonic() + timeout
        while len(marks) < len(partitions) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
            for tp in partitions:
                mark = consumer.highwater(tp)
                if mark is not None:
                    marks[tp] = mark
        return marks
    finally:
        consumer.close(autocommit=False)


def committed_offsets(servers: str, group: str, topics: Iterable[str]) -> dict[Any, tuple[int, int]]:
    """Per partition of ``topics``: (the group's committed offset, -1 when none; the high watermark)."""
    from kafka import KafkaAdminClient

    marks = high_watermarks(servers, topics)
    admin = KafkaAdminClient(bootstrap_servers=servers)
    try:
        committed = admin.list_group_offsets({group: list(marks)}).get(group, {})
    finally:
        admin.close()
    out = {}
    for tp, mark in marks.items():
        meta = committed.get(tp)
        out[tp] = (meta.offset if meta is not None else -1, mark)
    return out


def consumer_lag(servers: str, group: str, topics: Iterable[str]) -> int:
    """High watermarks minus the group's committed offsets over ``topics`` (nothing committed: all of it)."""
    return sum(mark - max(offset, 0) for offset, mark in committed_offsets(servers, group, topics).values())


def daily_chunks(lines: list[str]) -> list[list[str]]:
    """Split a simulated file where the newest event day advances: what one day of reporting delivers."""
    chunks: list[list[str]] = [[]]
    newest: date | None = None
    for line in lines:
        day: date | None
        try:
            day = datetime.fromisoformat(json.loads(line)["occurred_at"]).astimezone(UTC).date()
        except (ValueError, KeyError, TypeError):
            day = newest
        if newest is not None and day is not None and day > newest and chunks[-1]:
            chunks.append([])
        if day is not None and (newest is None or day > newest):
            newest = day
        chunks[-1].append(line)
    return chunks
