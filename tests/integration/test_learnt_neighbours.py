"""New-substance alerts name the structures the network learnt, through the real broker, worker and engine.

A never-catalogued nitazene analogue (Protonitazepyne) is reported, then another (Metonitazepyne): the second
alert names the first among the structures "reported earlier to the network", as of its stored-before cut.
The section's cut is the Kafka timestamp of the sightings message that raised the alert (less the settle time, 0
here): a replay reads that message again and asks the store the same question (the stored-before set does not
change: tests/storage/test_learnt.py; the kill-and-replay model: tests/detect/test_replay.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from synthwatch.kafka_clients import kafka_python_config
from synthwatch.producers.publisher import Publisher
from synthwatch.producers.readers import InputRecord
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, high_watermarks
from tests.conftest import RunningWorker, isolated_settings, ndjson, start_worker, stop_worker
from tests.support.factories import lab

PROTONITAZEPYNE = "CCCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"
METONITAZEPYNE = "COc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"

NEW_SUBSTANCES = (
    "SELECT alert_id, substance_name, learnt_substances FROM alerts WHERE alert_type = 'new_substance' "
    "ORDER BY evidence_event_ids[1]"
)


def _publish(settings: Settings, broker: EmbeddedBroker, record: dict[str, Any]) -> None:
    with Publisher(settings, broker.bootstrap_servers) as publisher:
        summary = publisher.publish_records([InputRecord(source=str(record["event_id"]), raw=ndjson([record]))])
    assert summary.sent == 1


def _sightings_stamps(settings: Settings, servers: str) -> dict[str, datetime]:
    """Event id -> the timestamp of the first sightings message that carried it (what the novelty stage read)."""
    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, **kafka_python_config(settings))
    topic = settings.topic_sightings
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        # as fetches report it: Tansu answers ListOffsets with the first offset of the last record batch
        end = high_watermarks(servers, [topic])
        assert set(end) == set(partitions), f"no end offset for some partition of {topic} within the timeout"
        found: dict[str, datetime] = {}
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=200).values():
                for record in sorted(records, key=lambda r: r.offset):
                    for sighting in json.loads(record.value):
                        found.setdefault(sighting["event_id"], datetime.fromtimestamp(record.timestamp / 1000, UTC))
        return found
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.slow
def test_the_second_analogue_names_the_first_learnt_one_as_of_its_sightings_message(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    # No settle time: the test stores the first report before it sends the second (one clock, one engine).
    settings = isolated_settings(broker, tmp_path, learnt_settle_seconds=0)
    first = lab(event_id="ln-1", substance={"name": "Protonitazepyne", "smiles": PROTONITAZEPYNE}, lab_id="LAB-FR-01")
    second = lab(
        event_id="ln-2", region="FR-69M", substance={"name": "Metonitazepyne", "smiles": METONITAZEPYNE}, lab_id="L-2"
    )
    worker: RunningWorker = start_worker(settings, tmp_path / "worker-1.log")
    try:
        _publish(settings, broker, first)
        worker.wait_rows(
            "SELECT event_id FROM lab_detections WHERE event_id = 'ln-1'", {}, 1, "the first report stored"
        )
        worker.wait_rows(NEW_SUBSTANCES, {}, 1, "the first new-substance alert", timeout=90)
        _publish(settings, broker, second)
        rows = worker.wait_rows(NEW_SUBSTANCES, {}, 2, "the second new-substance alert", timeout=90)
    finally:
        stop_worker(worker)

    learnt = [json.loads(row["learnt_substances"]) for row in rows]
    assert [row["substance_name"] for row in rows] == ["Protonitazepyne", "Metonitazepyne"]
    assert learnt[0]["substances"] == []  # nothing learnt before the first: the catalogue part names its relatives
    (named,) = learnt[1]["substances"]
    assert (named["name"], named["catalogued"], named["controlled"], named["family"]) == (
        "Protonitazepyne",
        False,
        None,
        "nitazene",
    )
    assert named["score"] == 0.8

    # The cut is the raising sightings message's timestamp (settle 0): fixed in the log, read again by a replay.
    stamps = _sightings_stamps(settings, broker.bootstrap_servers)
    assert [datetime.fromisoformat(section["as_of"]) for section in learnt] == [stamps["ln-1"], stamps["ln-2"]]
