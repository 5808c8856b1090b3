"""The pipeline benchmark's audit of a phase (``--keep``): which events were not stored, where they are in Kafka,
and whether the group committed past them.

Real parts: the session's Tansu broker (records published and a group's offsets committed here) and the
embedded ClickHouse (the input tables after the migrations, read through the analysts' path as ``/sql`` does).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from synthwatch.bench.audit import audit_phase
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.query import QueryResult, analyst_client, execute_analyst


def test_audit_finds_unstored_events_and_tells_committed_past_from_not_committed(
    broker: EmbeddedBroker, ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    servers = broker.bootstrap_servers
    run = uuid.uuid4().hex[:6]
    topic, group, prefix = f"audit-{run}", f"audit-group-{run}", f"rss-{run}-"
    admin = KafkaAdminClient(bootstrap_servers=servers)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=servers)
    for i in range(10):  # even indices on partition 0, odd on 1: offsets i // 2
        producer.send(topic, partition=i % 2, value=json.dumps({"event_id": f"{prefix}{i}"}).encode())
    producer.flush()
    producer.close()
    # the group committed partition 0 up to offset 3 (indices 0, 2, 4 done) and partition 1 not at all
    committer = KafkaConsumer(bootstrap_servers=servers, group_id=group, enable_auto_commit=False)
    try:
        committer.commit({TopicPartition(topic, 0): OffsetAndMetadata(3, "")})
    finally:
        committer.close(autocommit=False)

    migrate(ch)
    stored = [i for i in range(10) if i not in (2, 6, 7)]  # 2: committed past; 6: at the commit; 7: uncommitted
    ch.insert("lab_detections", [[f"{prefix}{i}"] for i in stored if i < 5], column_names=["event_id"])
    ch.insert("border_seizures", [[f"{prefix}{i}"] for i in stored if i >= 5], column_names=["event_id"])
    ch.insert("lab_detections", [["rss-other-2"]], column_names=["event_id"])  # another phase's id: not counted
    analyst = analyst_client(ch_settings)

    def query(sql: str, parameters: dict[str, Any] | None) -> QueryResult:
        return execute_analyst(analyst, sql, parameters)

    out = tmp_path / "audit.json"
    try:
        report = audit_phase(query, servers, group, [topic], prefix, 10, out)
    finally:
        analyst.close()

    assert json.loads(out.read_text(encoding="utf-8")) == report
    assert (report["generated"], report["stored_rows"], report["stored_distinct"], report["missing"]) == (10, 7, 7, 3)
    assert report["offsets"] == [
        {"topic": topic, "partition": 0, "committed": 3, "high_watermark": 5},
        {"topic": topic, "partition": 1, "committed": -1, "high_watermark": 5},
    ]
    places = {e["index"]: (e["partition"], e["offset"], e["committed_past"]) for e in report["events"]}
    assert places == {2: (0, 1, True), 6: (0, 3, False), 7: (1, 3, False)}
    assert (report["missing_committed_past"], report["missing_not_in_kafka"]) == (1, 0)
