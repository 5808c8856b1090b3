"""A third-party Kafka client against the embedded broker: confluent-kafka (librdkafka), as most non-Python
labs' tools use it, publishes a report and reads the alert it raised from a real worker.

The client settings are the ones README.md ("Kafka clients other than synthwatch's") documents, above all
``session.timeout.ms``: Tansu holds a consumer's JoinGroup for about half the session timeout, so with
librdkafka's default (45 s) a subscribing consumer got its partitions only after ~23 s (docs/performance.md).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import confluent_kafka  # a test dependency (pyproject.toml [dev]): missing, the test fails rather than skips
import pytest

from synthwatch.stack.broker import EmbeddedBroker
from tests.conftest import isolated_settings, start_worker, stop_worker, wait_until
from tests.support.factories import lab

#: What a librdkafka client needs against the embedded broker (README.md documents each).
PRODUCER_SETTINGS = {"acks": "all", "partitioner": "murmur2_random"}
CONSUMER_SETTINGS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "auto.offset.reset": "earliest"}


@pytest.mark.integration
def test_confluent_kafka_publishes_a_report_and_reads_its_alert(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = isolated_settings(broker, tmp_path / "data")
    worker = start_worker(settings, tmp_path / "worker.log")
    consumer = None
    try:
        name = f"Confluentine {uuid.uuid4().hex[:6]}"  # a substance nobody reported: a new_substance alert
        report = lab(event_id=f"ck-{uuid.uuid4().hex[:8]}", substance={"name": name})
        delivered: list[Any] = []
        producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap_servers, **PRODUCER_SETTINGS})
        producer.produce(
            settings.topic_lab_detections,
            key=report["region"].encode(),
            value=json.dumps(report).encode(),
            on_delivery=lambda error, message: delivered.append(error),
        )
        assert producer.flush(30) == 0
        assert delivered == [None]

        assignments: list[float] = []
        consumer = confluent_kafka.Consumer(
            {"bootstrap.servers": broker.bootstrap_servers, "group.id": f"lab-tool-{uuid.uuid4().hex[:6]}"}
            | CONSUMER_SETTINGS
        )
        subscribed = time.monotonic()
        consumer.subscribe(
            [settings.topic_alerts], on_assign=lambda c, parts: assignments.append(time.monotonic() - subscribed)
        )
        alerts: list[dict[str, Any]] = []

        def alert_read() -> bool:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                alert = json.loads(message.value())
                if alert.get("substance", {}).get("name") == name:
                    alerts.append(alert)
            return bool(alerts)

        wait_until(alert_read, 120, f"the new_substance alert of {name} through confluent-kafka", interval=0,
                   details=worker.describe)  # fmt: skip
        print(f"\nconfluent-kafka consumer: partitions {assignments[0]:.1f} s after subscribe")
        assert alerts[0]["alert_type"] == "new_substance"
        assert alerts[0]["region"] == report["region"]

        # The report is stored at the worker's next checkpoint, while its sighting (so the alert) is sent at once
        # (stream_apps/runtime/agents/intake.py): the alert may be read before the row exists. Seen once under load
        # 10 with the compiled detection core (0 rows right after the alert).
        def stored() -> int:
            query = "SELECT count() FROM lab_detections WHERE event_id = %(id)s"
            return worker.count(query, {"id": report["event_id"]})

        wait_until(lambda: stored() >= 1, 60, "the report stored at the worker's checkpoint", details=worker.describe)
        assert stored() == 1
    finally:
        if consumer is not None:
            consumer.close()
        stop_worker(worker)
