"""An agent that meets a record it cannot handle: the record is refused or the worker fails, never a silent stall.

Before: an exception out of an agent made Faust restart it on the same stream, which the batching had stopped
when the dead agent's batches were closed (stream_apps/runtime/batches.py), so the restarted agent took
nothing and returned; what the dead one held was never acknowledged. The worker stayed up and ready until the
watchdog's stall time, with every later record of that agent's topic unprocessed.

Real broker (Tansu), real engine (chDB), real worker processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaProducer

from synthwatch.producers.publisher import Publisher
from synthwatch.producers.readers import InputRecord
from synthwatch.schemas.worker_keys import WorkerSigner, settings_worker_keys
from synthwatch.stack.broker import EmbeddedBroker
from tests.conftest import isolated_settings, start_worker, stop_worker, wait_until
from tests.support.factories import lab

pytestmark = pytest.mark.integration

#: Signed records of the sightings topic that are not sightings records, each with a word its reason names.
NOT_SIGHTINGS: list[tuple[bytes, bytes, str]] = [
    (b"k-text", b"not json", "JSONDecodeError"),
    (b"k-object", b'{"event_id": "x"}', "not a JSON array"),
    (b"k-fields", b'[{"event_id": "x", "occurred_at": "2026-03-01T10:00:00+00:00"}]', "TypeError"),
]


def test_a_signed_record_that_is_not_sightings_is_refused_and_the_novelty_agent_goes_on(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A worker bug, or a publisher holding the worker key, puts records on the sightings topic that do not
    parse: each is refused into the rejects topic with its reason, and every valid report's sighting is
    still processed (a new-substance alert each). Before, the first one crashed the novelty agent, no reject
    was sent and no sighting was processed again (the test timed out at its first wait)."""
    (tmp_path / "worker").mkdir()
    settings = isolated_settings(broker, tmp_path / "worker")
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        signer = WorkerSigner(settings_worker_keys(settings))  # the key the worker made in its data directory
        topic = settings.topic_sightings
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        try:
            for key, value, _ in NOT_SIGHTINGS:
                producer.send(topic, key=key, value=value, headers=signer.headers(topic, key, value)).get(30)
        finally:
            producer.close()
        wait_until(
            lambda: worker.stats()["rejects_stored"] >= len(NOT_SIGHTINGS),
            60,
            "the records that are not sightings stored as rejects",
            details=worker.describe,
        )
        reports = [
            json.dumps(lab(event_id=f"af-{i}", sample_id=f"AF-{i}", substance={"name": f"Agentfailine-{i}"}))
            for i in range(8)
        ]
        with Publisher(settings, broker.bootstrap_servers) as publisher:
            sent = publisher.publish_records(InputRecord(source=f"af:{i}", raw=r) for i, r in enumerate(reports))
        assert sent.sent == len(reports)
        stats = wait_until(
            lambda: (
                (s := worker.stats())["sightings"] >= len(reports)
                and s["sightings_processed"] == s["sightings"]
                and s["alerts_stored"] >= len(reports)
                and s
            ),
            60,
            "every valid report's sighting processed and its alert stored",
            details=worker.describe,
        )
        rejects = worker.query(
            "SELECT source, reason, stage FROM rejects WHERE startsWith(source, {topic:String}) ORDER BY source",
            {"topic": topic + ":"},
        ).as_dicts()
        alerts = worker.query(
            "SELECT substance_name FROM alerts WHERE alert_type = 'new_substance' ORDER BY substance_name"
        ).as_dicts()
        log = worker.log_path.read_text(errors="replace")
        assert worker.process.poll() is None
    finally:
        stop_worker(worker)
    print(f"\n[not sightings] rejects {len(rejects)}, new-substance alerts {len(alerts)}; worker {stats}")
    assert len(rejects) == len(NOT_SIGHTINGS)
    assert all(r["stage"] == "worker" and r["reason"].startswith("not a sightings record: ") for r in rejects)
    reasons = " | ".join(r["reason"] for r in rejects)
    assert all(word in reasons for _, _, word in NOT_SIGHTINGS), reasons
    assert sorted(a["substance_name"] for a in alerts) == sorted(f"Agentfailine-{i}" for i in range(8))
    assert stats["rejected"] == len(NOT_SIGHTINGS)  # counted where they were refused, as the intake counts
    assert "Restarting dead" not in log and "Crashed reason" not in log


def test_a_defect_in_an_agent_stops_the_worker_at_once_and_its_restart_loses_nothing(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """An exception out of the intake agent (a defect injected into the region stage, once, on one event):
    the worker says which agent failed, counts it and exits with status 1 instead of restarting the agent in
    place; the next worker (what an orchestrator starts) processes every record after the committed offsets,
    the failing one included: every event stored once. Before, the worker stayed up with the intake taking
    nothing (the test timed out waiting for it to exit)."""
    (tmp_path / "worker").mkdir()
    settings = isolated_settings(broker, tmp_path / "worker", checkpoint_seconds=0.2)
    first = [json.dumps(lab(event_id=f"df-{i}", sample_id=f"DF-{i}")) for i in range(5)]
    second = [json.dumps(lab(event_id=f"df-{i}", sample_id=f"DF-{i}")) for i in range(5, 12)]

    def publish(reports: list[str], part: str) -> None:
        with Publisher(settings, broker.bootstrap_servers) as publisher:
            sent = publisher.publish_records(InputRecord(source=f"{part}:{i}", raw=r) for i, r in enumerate(reports))
        assert sent.sent == len(reports)

    worker = start_worker(settings, tmp_path / "failing.log", module=("tests.support.agent_faults", "df-7"))
    try:
        publish(first, "first")
        wait_until(lambda: worker.stats()["checkpointed"] >= len(first), 60, "the first part stored")
        publish(second, "second")  # df-7 makes the intake agent raise
        code = wait_until(
            lambda: worker.process.poll(), 60, "the worker to exit after its agent failed", details=worker.describe
        )
    finally:
        stop_worker(worker)
    log = worker.log_path.read_text(errors="replace")
    assert code == 1, log[-3000:]
    assert "agent intake failed: RuntimeError: injected defect in the region stage on df-7" in log
    assert "stopping the worker (exit status 1)" in log
    assert "Restarting dead" not in log

    restarted = start_worker(settings, tmp_path / "restarted.log")
    try:
        every = "SELECT count(), uniqExact(event_id) FROM lab_detections WHERE startsWith(event_id, 'df-')"
        rows = wait_until(
            lambda: (found := restarted.query(every).rows[0])[0] >= len(first) + len(second) and found,
            60,
            "every event stored after the restart",
            details=restarted.describe,
        )
        stats = restarted.stats()
    finally:
        stop_worker(restarted)
    print(f"\n[agent defect] exit {code}; after the restart: rows {rows[0]}, unique {rows[1]}; worker {stats}")
    assert int(rows[0]) == int(rows[1]) == len(first) + len(second)
    assert stats["ready"] and stats["failed"] is None
