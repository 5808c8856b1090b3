"""What a Kafka cluster holds, read from outside a worker: topic contents (ends and committed offsets are
:mod:`synthwatch.stack.broker`'s).

Shared by the reliability tests and the crash benchmark (:mod:`synthwatch.bench.crash`): "done" means
the group has committed every partition's end, not merely that rows look complete.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime


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
