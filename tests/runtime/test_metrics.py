"""Worker and publisher metrics: the helpers count what they should, and a real Faust worker serves them.

The integration test runs a small Faust app with :func:`attach_metrics` against the session's Tansu
broker, scrapes ``/metrics`` over HTTP and watches consumer lag rise while its agent is stuck.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from synthwatch.producers.metrics import PublisherMetrics
from synthwatch.producers.publisher import PublishSummary
from synthwatch.schemas import Alert, AlertSubstance, Reject
from synthwatch.schemas.reject_reasons import reject_reason
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, ensure_topics, free_port
from synthwatch.stream_apps.runtime.metrics import PartitionOffsets, WorkerMetrics, ingest_times
from tests.conftest import terminate, wait_until


def samples(exposition: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(name, sorted labels) -> value, parsed with prometheus-client's own parser."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(exposition: bytes | str, name: str, **labels: str) -> float | None:
    return samples(exposition).get((name, tuple(sorted(labels.items()))))


def event(topic: str, partition: int, offset: int, timestamp: float) -> Any:
    return SimpleNamespace(
        message=SimpleNamespace(topic=topic, partition=partition, offset=offset, timestamp=timestamp)
    )


def alert(alert_type: str, severity: str, evidence: list[str]) -> Alert:
    now = datetime.now(UTC)
    return Alert(
        alert_id=uuid.uuid4().hex,
        alert_type=alert_type,  # type: ignore[arg-type]
        severity=severity,  # type: ignore[arg-type]
        substance=AlertSubstance(name="X", key="name:x"),
        window_start=now - timedelta(days=1),
        window_end=now,
        triggered_at=now,
        evidence_event_ids=evidence,
    )


def test_two_workers_in_one_process_keep_separate_counts() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    first.consumed([event("labs", 0, 1, 0.0)] * 3)
    assert value(first.exposition(), "synthwatch_events_consumed_total", topic="labs") == 3
    assert value(second.exposition(), "synthwatch_events_consumed_total", topic="labs") is None


def test_helpers_count_what_the_agents_report() -> None:
    m = WorkerMetrics(app_id="synthwatch-test")
    m.consumed([event("labs", 0, 1, 10.0), event("labs", 1, 7, 11.0), event("seizures", 0, 3, 12.0)])
    m.produced("alerts", 2)
    m.produced("alerts", 0)
    m.stored("lab_detections", 5)
    m.skipped_duplicates(4)
    m.rejected(
        [
            Reject.of("{", source="s", reason="invalid JSON: EOF while parsing", stage="worker"),
            Reject.of("{}", source="s", reason="region: not ISO 3166-2; country: missing", stage="worker"),
        ]
    )
    m.set_ready()
    text = m.exposition()
    assert value(text, "synthwatch_events_consumed_total", topic="labs") == 2
    assert value(text, "synthwatch_events_consumed_total", topic="seizures") == 1
    assert value(text, "synthwatch_last_consumed_timestamp_seconds", topic="labs") == pytest.approx(time.time(), abs=5)
    assert value(text, "synthwatch_events_produced_total", topic="alerts") == 2
    assert value(text, "synthwatch_events_stored_total", table="lab_detections") == 5
    assert value(text, "synthwatch_duplicates_total") == 4
    assert value(text, "synthwatch_rejects_total", stage="worker", reason="invalid_json") == 1
    assert value(text, "synthwatch_rejects_total", stage="worker", reason="invalid_region") == 1
    m.late("lab_detection")
    m.late("border_seizure", 2)
    m.late("lab_detection", 0)
    text = m.exposition()
    assert value(text, "synthwatch_late_events_total", kind="lab_detection") == 1
    assert value(text, "synthwatch_late_events_total", kind="border_seizure") == 2
    assert value(text, "synthwatch_worker_ready") == 1
    assert value(text, "synthwatch_worker_info", app_id="synthwatch-test") == 1


def test_reject_reasons_become_a_few_label_values() -> None:
    assert reject_reason("quantity.value: must be > 0") == "invalid_quantity_value"
    assert reject_reason("substance.name: blank") == "invalid_substance_name"
    assert reject_reason("kind: unknown kind; expected 'lab_detection' or 'border_seizure'") == "invalid_kind"
    assert reject_reason("empty message (no value)") == "empty_message"
    assert reject_reason("not a reject record: 1 validation error") == "not_a_reject_record"
    assert reject_reason("not a sightings record: JSONDecodeError: Expecting value") == "not_a_sightings_record"
    assert reject_reason("something nobody expected") == "other"
    assert len(reject_reason("a" * 200 + ": b")) <= 48


def test_a_batch_of_rejects_is_counted_with_one_label_lookup_per_label_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of 10,000 invalid reports is counted with a lookup of the counter's labels per label set, not per
    reject: one each held the event loop ~40 ms in one piece (the batch's longest hold once it gave turns)."""
    m = WorkerMetrics()
    rejects = [
        Reject.of(b"{}", source=f"labs:0:{k}", reason="kind: unknown kind; expected 'lab_detection'", stage="worker")
        for k in range(1000)
    ]
    empty = "empty message (no value)"
    rejects += [Reject.of(b"", source=f"labs:0:{k}", reason=empty, stage="worker") for k in range(3)]
    rejects += [Reject.of(b"x", source="labs:1:0", reason="kind: unknown kind; expected 'x'", stage="auth")]
    lookups: list[dict[str, str]] = []
    labels = m.rejects.labels
    monkeypatch.setattr(m.rejects, "labels", lambda **kw: lookups.append(kw) or labels(**kw))

    m.rejected(rejects)
    m.rejected([])

    text = m.exposition()
    assert value(text, "synthwatch_rejects_total", stage="worker", reason="invalid_kind") == 1000
    assert value(text, "synthwatch_rejects_total", stage="worker", reason="empty_message") == 3
    assert value(text, "synthwatch_rejects_total", stage="auth", reason="invalid_kind") == 1
    assert m.stats.rejected == 1004
    assert len(lookups) == 3


def test_alert_latency_runs_from_the_triggering_event() -> None:
    m = WorkerMetrics()
    events = [event("labs", 0, 1, 100.0), event("labs", 0, 2, 104.0)]
    items = [SimpleNamespace(event_id="e1", source="labs:0:1"), SimpleNamespace(event_id="e2", source="labs:0:2")]
    ingested = ingest_times(events, items)
    assert ingested == {"e1": 100.0, "e2": 104.0}
    m.alerts_published(
        [alert("spike", "critical", ["e1", "e2"]), alert("first_in_region", "warning", ["old"])],
        ingested,
        published_at=110.0,
    )
    m.alerts_published([alert("new_substance", "warning", [])], 50.0, published_at=51.5)
    text = m.exposition()
    assert value(text, "synthwatch_alerts_total", alert_type="spike", severity="critical") == 1
    # spike: newest evidence (e2, 104) -> 6 s; first_in_region: no known evidence -> batch start (100) -> 10 s
    assert value(text, "synthwatch_alert_latency_seconds_sum", alert_type="spike") == pytest.approx(6.0)
    assert value(text, "synthwatch_alert_latency_seconds_sum", alert_type="first_in_region") == pytest.approx(10.0)
    assert value(text, "synthwatch_alert_latency_seconds_sum", alert_type="new_substance") == pytest.approx(1.5)
    assert value(text, "synthwatch_alert_latency_seconds_bucket", alert_type="spike", le="5.0") == 0
    assert value(text, "synthwatch_alert_latency_seconds_bucket", alert_type="spike", le="10.0") == 1


def test_sink_timing_retries_and_failing_flag() -> None:
    m = WorkerMetrics()
    with m.sink_batch("alerts", 120):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), m.sink_batch("alerts", 5):
        raise RuntimeError("ClickHouse down")  # a failed call is not observed as a batch
    m.sink_retry("storing alerts")
    m.sink_retry("storing alerts")
    assert m.timed_call("rejects", 3, lambda: 42)() == 42
    text = m.exposition()
    assert value(text, "synthwatch_sink_batch_rows_count", table="rejects") == 1
    assert value(text, "synthwatch_sink_batch_rows_count", table="alerts") == 1
    assert value(text, "synthwatch_sink_batch_rows_sum", table="alerts") == 120
    assert value(text, "synthwatch_sink_batch_seconds_sum", table="alerts") >= 0.01  # type: ignore[operator]
    assert value(text, "synthwatch_sink_retries_total", operation="storing alerts") == 2
    assert value(text, "synthwatch_sink_failing", operation="storing alerts") == 1
    m.sink_recovered("storing alerts")
    assert value(m.exposition(), "synthwatch_sink_failing", operation="storing alerts") == 0


def test_consumer_lag_series_follow_the_assignment() -> None:
    m = WorkerMetrics()
    m.set_consumer_lag([PartitionOffsets("labs", 0, end=120, committed=100), PartitionOffsets("labs", 1, 5, 9)])
    text = m.exposition()
    assert value(text, "synthwatch_consumer_lag", topic="labs", partition="0") == 20
    assert value(text, "synthwatch_consumer_lag", topic="labs", partition="1") == 0  # never negative
    m.set_consumer_lag([PartitionOffsets("labs", 1, 50, 40)])  # partition 0 went to another worker
    text = m.exposition()
    assert value(text, "synthwatch_consumer_lag", topic="labs", partition="0") is None
    assert value(text, "synthwatch_consumer_lag", topic="labs", partition="1") == 10


def test_publisher_metrics_from_a_summary(tmp_path: Path) -> None:
    m = PublisherMetrics()
    summary = PublishSummary(
        read=10, sent=6, rejected=2, duplicates=1, failed=[("event x", "timeout")], reject_reasons={"region": 2}
    )
    m.observe(summary, 1.5, {"synthwatch.lab-detections": 4, "synthwatch.border-seizures": 2})
    path = tmp_path / "publish.prom"
    m.write_textfile(path)
    text = path.read_text()
    assert value(text, "synthwatch_publish_records_total", outcome="sent") == 6
    assert value(text, "synthwatch_publish_records_total", outcome="failed") == 1
    assert value(text, "synthwatch_publish_rejects_total", reason="invalid_region") == 2
    assert value(text, "synthwatch_publish_events_produced_total", topic="synthwatch.lab-detections") == 4
    assert value(text, "synthwatch_publish_duration_seconds") == 1.5
    assert value(text, "synthwatch_publish_last_success_timestamp_seconds") == 0  # a record failed


# --- a real Faust worker ---------------------------------------------------------------------------------

WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from typing import Any
    import faust
    from synthwatch.stack.service_worker import ServiceWorker
    from synthwatch.stream_apps.runtime.metrics import WorkerMetrics, attach_metrics

    bootstrap, topic, port, datadir, app_id = sys.argv[1:6]
    app = faust.App(
        app_id, broker=f"kafka://{bootstrap}", store="memory://", datadir=datadir,
        web_host="127.0.0.1", web_bind="127.0.0.1", web_port=int(port), topic_partitions=2,
        consumer_auto_offset_reset="earliest", broker_session_timeout=4.0, broker_heartbeat_interval=1.0,
        broker_commit_interval=0.5, stream_wait_empty=False,
    )
    metrics = WorkerMetrics(app_id=app_id)
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")

    @app.agent(source)
    async def consume(stream: Any) -> None:
        async for events in stream.take_events(100, within=0.2):
            metrics.consumed(events)
            if any(e.value == b"block" for e in events):
                await asyncio.sleep(3600)  # stuck: nothing more is committed, lag must grow

    @app.task
    async def ready() -> None:
        metrics.set_ready()

    attach_metrics(app, metrics, topics={topic}, lag_interval=1.0)
    # the class of `synthwatch worker`: no idle second before its loop closes at the stop
    ServiceWorker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()
    """
)


@pytest.fixture
def metrics_worker(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:6]
    settings = Settings(
        data_dir=tmp_path,
        partitions=2,
        topic_lab_detections=f"metrics-in-{suffix}",
        topic_border_seizures=f"metrics-unused-{suffix}",
        topic_rejects=f"metrics-rejects-{suffix}",
        topic_alerts=f"metrics-alerts-{suffix}",
        topic_sightings=f"metrics-sightings-{suffix}",
    )
    ensure_topics(settings, broker.bootstrap_servers)
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    port = free_port()
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(script),
                broker.bootstrap_servers,
                settings.topic_lab_detections,
                str(port),
                str(tmp_path / "faust"),
                f"metrics-test-{suffix}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}", settings.topic_lab_detections
    finally:
        terminate(process)
        print(log.read_text(errors="replace")[-3000:])


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            return str(response.read().decode())
    except OSError:
        return None


@pytest.mark.integration
def test_worker_serves_metrics_and_tracks_consumer_lag(metrics_worker: tuple[str, str], broker: EmbeddedBroker) -> None:
    from kafka import KafkaProducer

    url, topic = metrics_worker
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers.split(","))

    def send(values: list[bytes]) -> None:
        for v in values:
            producer.send(topic, value=v, partition=0)
        producer.flush(10)

    def lag(text: str) -> float | None:
        return value(text, "synthwatch_consumer_lag", topic=topic, partition="0")

    first = wait_until(lambda: _scrape(url), 90, "the worker's /metrics page")
    assert any(name == "synthwatch_worker_info" for name, _ in samples(first))
    send([json.dumps({"n": i}).encode() for i in range(5)])
    text = wait_until(
        lambda: (
            (t := _scrape(url)) and value(t, "synthwatch_events_consumed_total", topic=topic) == 5 and lag(t) == 0 and t
        ),
        60,
        "5 records consumed, committed and lag 0",
    )
    assert value(text, "synthwatch_worker_ready") == 1
    assert any(name.startswith("faust_") for name, _ in samples(text)), "Faust's own sensor shares the registry"

    send([b"block"] + [json.dumps({"n": i}).encode() for i in range(7)])
    text = wait_until(lambda: (t := _scrape(url)) and (lag(t) or 0) >= 7 and t, 60, "lag of the stuck partition")
    assert lag(text) == 8  # "block" and the 7 after it are not committed
    producer.close()


def test_one_call_keeps_the_ready_counters_and_prometheus_in_step() -> None:
    """WorkerStats lives in WorkerMetrics: each helper the agents call updates /ready's counter and the
    Prometheus series together (they were updated side by side before, and could drift apart)."""
    m = WorkerMetrics()
    refused = [Reject.of(b"{", source="labs:0:1", reason="invalid JSON: x", stage="worker")] * 2
    m.rejected(refused)
    m.skipped_duplicates(3)
    m.late("lab_detection")
    m.replayed_records("intake", 4)
    m.replayed_records("novelty", 5)
    m.records_stored("rejects", 2)
    m.records_stored("alerts", 6)
    m.events_checkpointed(10, lab_detections=7, border_seizures=1, already_stored=2)
    m.intake_batch(10, sightings=8)
    m.sightings_processed(8)
    m.alerts_raised(1)
    m.refused_forged("alerts", 2)
    m.consumer_stalled("labs")
    m.sink_retry("storing events")
    s = m.stats
    assert (s.rejected, s.duplicates, s.late, s.replayed, s.replayed_sightings) == (2, 5, 1, 4, 5)
    assert (s.rejects_stored, s.alerts_stored, s.checkpointed, s.stored) == (2, 6, 10, 8)
    assert (s.consumed, s.intake_batches, s.sightings, s.sightings_processed, s.alerts_raised) == (10, 1, 8, 8, 1)
    assert (s.forged, s.consumer_stalls, s.sink_retries) == (2, 1, 1)
    text = m.exposition()
    assert value(text, "synthwatch_rejects_total", stage="worker", reason="invalid_json") == 2
    assert value(text, "synthwatch_duplicates_total") == 5
    assert value(text, "synthwatch_replayed_total", stage="novelty") == 5
    assert value(text, "synthwatch_events_stored_total", table="lab_detections") == 7
    assert value(text, "synthwatch_events_stored_total", table="alerts") == 6
    assert value(text, "synthwatch_forged_records_total", topic="alerts") == 2
    assert value(text, "synthwatch_consumer_stalls_total", topic="labs") == 1
    assert value(text, "synthwatch_sink_retries_total", operation="storing events") == 1
