"""A region record in the changelog that a 2099 report changed before event times were bounded is healed by the
worker that recovers it: real broker (Tansu), real engine (chDB), real worker processes.

Before, the recovered watermark stayed at 2099 and every later report of the region and kind was stored late (out
of spikes), for ever; the only way out was to start once with empty state tables."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from pydantic_core import from_json, to_json

from synthwatch.producers.publisher import Publisher
from synthwatch.producers.readers import InputRecord
from synthwatch.schemas.topics import default_partition
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker
from synthwatch.stream_apps.detect.alerting import day_of
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from synthwatch.stream_apps.detect.region import Observation, RegionDetector, RegionState
from synthwatch.stream_apps.runtime.state_tables import SEAL_KEY, SEAL_VALUE
from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner
from tests.conftest import isolated_settings, ndjson, start_worker, stop_worker, wait_until
from tests.integration.test_reliability import _changelog_records
from tests.support.factories import seizure, sighting

pytestmark = pytest.mark.integration

REGION = "ML-BKO"
KEY = "6b" * 32
LATE = "SELECT event_id, toUInt8(late) AS late FROM border_seizures WHERE event_id = {id:String}"


def _publish(settings: Settings, broker: EmbeddedBroker, record: dict[str, object]) -> None:
    with Publisher(settings, broker.bootstrap_servers) as publisher:
        summary = publisher.publish_records([InputRecord(source=str(record["event_id"]), raw=ndjson([record]))])
    assert summary.sent == 1


def _region_records(servers: str, changelog: str) -> dict[str, dict[str, object]]:
    """The newest value of every region and series record of the changelog (as the recovered table holds it)."""
    table: dict[str, dict[str, object]] = {}
    for key, value, _ in _changelog_records(servers, changelog):
        name = json.loads(key)
        if isinstance(name, str) and name.startswith(("R", "S")):
            table[name] = from_json(value)
    return table


def _plant_2099(servers: str, changelog: str, partitions: int) -> int:
    """What a worker before the bound wrote after a seizure dated 2099 in the region: its detector, on the records
    of the changelog, takes the report (no receipt time: only the schema's bound), and its changed records are
    sent signed as the worker's, then sealed (a lone last record: Tansu's end offset). Returns the day of 2099."""
    table = _region_records(servers, changelog)
    detector = RegionDetector()
    detector.fetch = table.get
    raw = seizure(event_id="sz-2099", seizure_id="S-2099", occurred_at="2099-06-01T10:00:00+00:00")
    (event,) = Intake(stage="backtest").process([RawMessage("t:0:0", json.dumps(raw))]).events
    observation = Observation.of(event)
    assert detector.observe(observation).late_by_hours is None
    changed = detector.drain_dirty()
    assert {region for region, _, _ in changed} == {REGION}
    _send_sealed(
        servers, changelog, [(key, value) for _, key, value in changed], default_partition(REGION.encode(), partitions)
    )
    return observation.day


def _send_sealed(servers: str, changelog: str, records: Iterable[tuple[Any, Any]], partition: int) -> None:
    """Send ``records`` (key, value) to ``changelog`` signed as the worker's, one at a time, then the seal: what a
    worker before the bound wrote at a checkpoint."""
    signer = WorkerSigner(bytes.fromhex(KEY))
    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    try:
        for key, value in records:
            record_key, encoded = json.dumps(key).encode(), to_json(value)
            headers = signer.headers(changelog, record_key, encoded, partition)
            producer.send(changelog, key=record_key, value=encoded, partition=partition, headers=headers)
            producer.flush()
        seal = json.dumps(SEAL_KEY).encode()
        headers = signer.headers(changelog, seal, SEAL_VALUE, partition)
        producer.send(changelog, key=seal, value=SEAL_VALUE, partition=partition, headers=headers)
        producer.flush()
    finally:
        producer.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_2099_region_watermark_recovered_from_the_changelog_is_healed_by_the_worker(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path, worker_key=KEY)
    servers, changelog = broker.bootstrap_servers, f"{settings.app_id}-detector-regions-changelog"
    now = datetime.now(UTC).replace(microsecond=0)
    worker = start_worker(settings, tmp_path / "worker-1.log")
    try:
        _publish(
            settings,
            broker,
            seizure(event_id="s-1", seizure_id="S-1", occurred_at=(now - timedelta(hours=3)).isoformat()),
        )
        worker.wait_rows(LATE, {"id": "s-1"}, 1, "the first report stored")
        wait_until(lambda: f"R:{REGION}" in _region_records(servers, changelog), 60, "the region's record written")
    finally:
        stop_worker(worker)
    far = _plant_2099(servers, changelog, settings.partitions)
    planted = RegionState.from_records(_region_records(servers, changelog)[f"R:{REGION}"])
    assert planted.watermarks["border_seizure"].year == 2099, "the changelog holds the 2099 watermark"

    worker = start_worker(settings, tmp_path / "worker-2.log")  # recovers the tables from the changelogs
    try:
        later = seizure(event_id="s-2", seizure_id="S-2", occurred_at=(now - timedelta(hours=1)).isoformat())
        _publish(settings, broker, later)
        rows = worker.wait_rows(LATE, {"id": "s-2"}, 1, "the report after the restart stored")
        assert rows == [{"event_id": "s-2", "late": 0}], "today's report is not late (it was, by 635,000 h)"

        def healed() -> RegionState | None:
            record = _region_records(servers, changelog)[f"R:{REGION}"]
            state = RegionState.from_records(record)
            return state if state.watermarks["border_seizure"].year < 2099 else None

        state = wait_until(healed, 60, "the healed region record written back")
        assert state.watermarks["border_seizure"] == datetime.fromisoformat(later["occurred_at"])
        assert far not in state.totals and far not in state.recent and state.pruned_day != far
        log = worker.log_path.read_text(errors="replace")
        assert log.count(f"detector state of region {REGION} held what a report dated past") == 1, log[-3000:]
        assert "border_seizure watermark 2099-06-01T10:00:00+00:00 -> none" in log
    finally:
        stop_worker(worker)


def _plant_2099_sighting(servers: str, changelog: str, key: str, partition: int) -> int:
    """What a worker before the bound wrote after a sighting dated 2099 of ``key`` in the region (sighted there
    already): its novelty stage, on the record of the changelog, takes it, and the changed record is sent signed as
    the worker's, then sealed. Returns the day of 2099."""
    table = {json.loads(k): from_json(v) for k, v, _ in _changelog_records(servers, changelog)}
    detector = NoveltyDetector(fetch=table.get)
    at = datetime(2099, 6, 1, 10, tzinfo=UTC)
    far = day_of(at)
    detector.observe(
        sighting(
            event_id="sz-2099", kind="border_seizure", occurred_at=at, day=far, country="ML", region=REGION, key=key
        )
    )
    _send_sealed(servers, changelog, detector.drain_dirty(), partition)
    return far


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_2099_substance_span_recovered_from_the_changelog_is_healed_by_the_worker(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The substance stage's record: a 2099 sighting in a region where the substance was sighted kept that region
    active in every later spread test of the substance; the worker that recovers the record ends the span on its
    real day, writes it back and says so once."""
    settings = isolated_settings(broker, tmp_path, worker_key=KEY)
    servers, changelog = broker.bootstrap_servers, f"{settings.app_id}-detector-substances-changelog"
    now = datetime.now(UTC).replace(microsecond=0)

    def substances() -> dict[str, tuple[dict[str, Any], int]]:
        records = _changelog_records(servers, changelog)
        return {json.loads(k): (from_json(v), p) for k, v, p in records if json.loads(k) != SEAL_KEY}

    worker = start_worker(settings, tmp_path / "worker-1.log")
    try:
        _publish(
            settings,
            broker,
            seizure(event_id="s-1", seizure_id="S-1", occurred_at=(now - timedelta(hours=3)).isoformat()),
        )
        worker.wait_rows(LATE, {"id": "s-1"}, 1, "the first report stored")
        ((key, (record, partition)),) = wait_until(substances, 60, "the substance's record written").items()
        today = record["d"]
    finally:
        stop_worker(worker)
    far = _plant_2099_sighting(servers, changelog, key, partition)
    assert substances()[key][0]["g"][REGION] == [today, far], "the changelog holds the 2099 span"

    worker = start_worker(settings, tmp_path / "worker-2.log")  # recovers the tables from the changelogs
    try:
        elsewhere = seizure(
            event_id="s-2",
            seizure_id="S-2",
            region="ML-2",
            occurred_at=(now - timedelta(hours=1)).isoformat(),
        )
        _publish(settings, broker, elsewhere)  # its sighting (the first in ML-2) loads the substance's record
        worker.wait_rows(LATE, {"id": "s-2"}, 1, "the report after the restart stored")

        def healed() -> dict[str, Any] | None:
            spans = substances()[key][0]["g"]
            return spans if spans[REGION][1] < far and "ML-2" in spans else None

        spans = wait_until(healed, 60, "the healed substance record written back")
        assert spans[REGION] == [today, today]
        log = worker.log_path.read_text(errors="replace")
        assert log.count(f"detector state of substance {key} held what a report dated past") == 1, log[-3000:]
        assert f"region {REGION} last seen 2099-06-01 -> " in log
    finally:
        stop_worker(worker)
