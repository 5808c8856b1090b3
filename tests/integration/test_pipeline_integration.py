"""End to end on real parts: `synthwatch publish` -> Tansu -> Faust worker -> embedded ClickHouse."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from tests.conftest import RunningWorker, ndjson, run_cli, wait_until
from tests.support.factories import lab, malformed_records, seizure

pytestmark = pytest.mark.integration


def _now_iso(minutes: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


def _valid_records(prefix: str, n_seizures: int, n_labs: int) -> list[dict[str, Any]]:
    """Seizures over five regions then lab detections, in time order from now.

    The tests share one worker, which flags reports more than 24 h older than the newest of their
    region and kind as late: times start from the wall clock so each test is newer than the previous one.
    """
    regions = [("ML", "ML-BKO"), ("MA", "MA-TNG"), ("SN", "SN-DK"), ("FR", "FR-75C"), ("NL", "NL-NH")]
    records = []
    for i in range(n_seizures):
        country, region = regions[i % len(regions)]
        records.append(
            seizure(
                event_id=f"{prefix}-s-{i}",
                country=country,
                region=region,
                occurred_at=_now_iso(i),
                quantity={"value": 1 + i, "unit": "g" if i % 2 else "kg"},
            )
        )
    for i in range(n_labs):
        records.append(
            lab(event_id=f"{prefix}-l-{i}", sample_id=f"S-{i}", purity_pct=float(i % 100), occurred_at=_now_iso(i))
        )
    return records


def _stored(stack: RunningWorker, prefix: str) -> int:
    return stack.count(
        "SELECT (SELECT count() FROM border_seizures WHERE startsWith(event_id, %(p)s))"
        " + (SELECT count() FROM lab_detections WHERE startsWith(event_id, %(p)s))",
        {"p": prefix},
    )


def _summary(stdout: str) -> dict[str, int]:
    """The numbers of `synthwatch publish`'s summary table."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) == 5 and all(c.isdigit() for c in cells):
            return dict(zip(["read", "sent", "rejected", "duplicates", "failed"], map(int, cells), strict=True))
    raise AssertionError(f"no summary in output:\n{stdout}")


def test_published_file_arrives_row_for_row_and_resend_adds_nothing(stack: RunningWorker, tmp_path: Path) -> None:
    prefix = f"rr{uuid.uuid4().hex[:6]}"
    records = _valid_records(prefix, 300, 200)
    path = tmp_path / "batch.ndjson"
    path.write_text(ndjson(records), encoding="utf-8")

    done = run_cli(stack.settings, "publish", str(path))
    assert done.returncode == 0, done.stderr
    summary = _summary(done.stdout)
    print(f"publish: {summary}")
    assert summary == {"read": 500, "sent": 500, "rejected": 0, "duplicates": 0, "failed": 0}
    wait_until(lambda: _stored(stack, prefix) == 500, 60, f"500 rows in ClickHouse; worker: {stack.stats()}")

    rows = stack.query(
        "SELECT event_id, country, region, substance_name, quantity_value, quantity_unit, grams, agency, "
        "seizure_id, formatDateTime(occurred_at, '%%Y-%%m-%%dT%%H:%%i:%%S') FROM border_seizures "
        "WHERE startsWith(event_id, %(p)s) ORDER BY event_id",
        {"p": prefix},
    ).as_dicts()
    expected = {r["event_id"]: r for r in records if r["kind"] == "border_seizure"}
    assert len(rows) == len(expected) == 300
    for row in rows:
        sent = expected[row["event_id"]]
        assert (row["country"], row["region"], row["substance_name"]) == (
            sent["country"],
            sent["region"],
            "Tramadol",
        )
        assert (row["quantity_value"], row["quantity_unit"]) == (
            sent["quantity"]["value"],
            sent["quantity"]["unit"],
        )
        factor = 1000 if sent["quantity"]["unit"] == "kg" else 1
        assert row["grams"] == pytest.approx(sent["quantity"]["value"] * factor)
        assert (row["agency"], row["seizure_id"]) == (sent["agency"], sent["seizure_id"])
        stored_at = datetime.fromisoformat(row["formatDateTime(occurred_at, '%Y-%m-%dT%H:%i:%S')"] + "+00:00")
        assert abs(stored_at - datetime.fromisoformat(sent["occurred_at"])) < timedelta(seconds=1)
    labs = stack.query(
        "SELECT event_id, sample_id, purity_pct, resolved_name FROM lab_detections WHERE startsWith(event_id, %(p)s)",
        {"p": prefix},
    ).as_dicts()
    assert len(labs) == 200 and {r["resolved_name"] for r in labs} == {"3-MMC"}
    assert all(r["purity_pct"] == float(int(r["event_id"].rsplit("-", 1)[1]) % 100) for r in labs)

    again = run_cli(stack.settings, "publish", str(path))
    assert again.returncode == 0 and _summary(again.stdout)["sent"] == 500
    # published after the re-send: when it lands, so has the re-send
    marker = seizure(event_id=f"{prefix}-marker", occurred_at=_now_iso(600))

    (tmp_path / "marker.ndjson").write_text(ndjson([marker]))
    assert run_cli(stack.settings, "publish", str(tmp_path / "marker.ndjson")).returncode == 0
    wait_until(lambda: _stored(stack, prefix) == 501, 60, f"the marker row; worker: {stack.stats()}")
    duplicates = stack.count(
        "SELECT count() - uniqExact(event_id) FROM border_seizures WHERE startsWith(event_id, %(p)s)",
        {"p": prefix},
    )
    refused = stack.count("SELECT count() FROM rejects WHERE startsWith(event_id, %(p)s)", {"p": prefix})
    print(
        f"after re-send: stored {_stored(stack, prefix)} (500 + marker), duplicate rows {duplicates}, rejects {refused}"
    )
    assert duplicates == 0
    assert refused == 0  # re-sent events are duplicates: skipped, never refused


def test_a_lab_report_362_hours_late_is_stored_flagged_and_its_alerts_say_how_late(
    stack: RunningWorker, tmp_path: Path
) -> None:
    """Issue 11 §3: a lab detection that occurred 362 h before the newest one from its region is stored
    (flagged late, its report delay kept) and raises new-substance / first-in-region alerts that say so."""
    prefix = f"lt{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC).replace(microsecond=0)
    back = now - timedelta(hours=362)

    def lab_at(n: str, region: str, name: str, occurred: datetime, reported: datetime) -> dict[str, Any]:
        return lab(
            event_id=f"{prefix}-{n}",
            country="PT",
            region=region,  # Lisbon and Porto: no other test reports from there
            substance={"name": f"{name} {prefix}"},
            occurred_at=occurred.isoformat(),
            reported_at=reported.isoformat(),
        )

    def publish(name: str, records: list[dict[str, Any]]) -> dict[str, int]:
        path = tmp_path / f"{name}.ndjson"
        path.write_text(ndjson(records))
        done = run_cli(stack.settings, "publish", str(path))
        assert done.returncode == 0, done.stderr
        return _summary(done.stdout)

    alerts_sql = (
        "SELECT alert_type, region, substance_name, reported_late, late_by_hours, summary FROM alerts "
        "WHERE position(substance_name, %(p)s) > 0 ORDER BY substance_name, alert_type"
    )
    late_before = stack.stats()["late"]
    # On time: Lisbon's newest lab report, and the first report of Firstinol anywhere (in Porto).
    first = publish(
        "on-time", [lab_at("now", "PT-11", "Ontimeol", now, now), lab_at("p", "PT-13", "Firstinol", now, now)]
    )
    assert (first["sent"], first["rejected"]) == (2, 0)
    stack.wait_rows(alerts_sql, {"p": prefix}, 2, "the on-time new_substance alerts")
    # 362 h late from Lisbon: a substance nobody reported, and Firstinol (so far seen only in Porto).
    second = publish(
        "late",
        [
            lab_at("late-new", "PT-11", "Latezepam", back, now + timedelta(minutes=2)),
            lab_at("late-first", "PT-11", "Firstinol", back, now + timedelta(minutes=3)),
        ],
    )
    assert (second["sent"], second["rejected"]) == (2, 0)
    alerts = stack.wait_rows(alerts_sql, {"p": prefix}, 4, f"the late reports' alerts; worker: {stack.stats()}")
    rows = stack.query(
        "SELECT event_id, late, reported_at IS NOT NULL AS dated, report_delay_seconds FROM lab_detections "
        "WHERE startsWith(event_id, %(p)s) ORDER BY event_id",
        {"p": prefix},
    ).as_dicts()
    refused = stack.count("SELECT count() FROM rejects WHERE startsWith(event_id, %(p)s)", {"p": prefix})
    stats = stack.stats()
    for row in rows + alerts:
        print(row)

    assert refused == 0
    flags = {r["event_id"][len(prefix) + 1 :]: (r["late"], r["dated"]) for r in rows}
    assert flags == {"late-first": (True, True), "late-new": (True, True), "now": (False, True), "p": (False, True)}
    delays = {r["event_id"][len(prefix) + 1 :]: r["report_delay_seconds"] for r in rows}
    assert delays["late-new"] == 362 * 3600 + 120 and delays["late-first"] == 362 * 3600 + 180 and delays["now"] == 0
    assert stats["late"] - late_before == 2
    by_name = {(a["substance_name"].split()[0], a["region"]): a for a in alerts}
    new = by_name[("Latezepam", "PT-11")]
    assert new["alert_type"] == "new_substance" and new["reported_late"] and new["late_by_hours"] == 362.0
    assert "Reported late" in new["summary"] and "362.0 h" in new["summary"]
    moved = by_name[("Firstinol", "PT-11")]
    assert moved["alert_type"] == "first_in_region" and moved["reported_late"] and moved["late_by_hours"] == 362.0
    assert "predates the network's first report received" in moved["summary"]
    on_time = by_name[("Firstinol", "PT-13")]
    assert on_time["alert_type"] == "new_substance" and not on_time["reported_late"]
    assert on_time["late_by_hours"] is None


def test_malformed_input_lands_in_rejects_and_counts_add_up(stack: RunningWorker, tmp_path: Path) -> None:
    prefix = f"mf{uuid.uuid4().hex[:6]}"
    bad = malformed_records(prefix)
    good = _valid_records(prefix, 20, 10)
    lines = [json.dumps(r) for r in good] + [r if isinstance(r, str) else json.dumps(r) for _, r, _ in bad]
    path = tmp_path / "mixed.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    done = run_cli(stack.settings, "publish", str(path))
    assert done.returncode == 1, done.stderr  # some records rejected, the rest sent
    summary = _summary(done.stdout)
    print(f"publish: {summary} for {len(lines)} lines")
    assert summary["sent"] + summary["rejected"] == len(lines)
    assert (summary["sent"], summary["rejected"]) == (30, len(bad))

    rejects = stack.wait_rows(
        "SELECT source, reason, event_id, raw FROM rejects WHERE source LIKE 'mixed.ndjson:%%' "
        "AND (startsWith(event_id, %(p)s) OR raw LIKE %(like)s)",
        {"p": prefix, "like": f"%{prefix}%"},
        len(bad),
        "all rejects stored",
    )
    wait_until(lambda: _stored(stack, prefix) == 30, 60, "the valid rows")
    by_line = {int(r["source"].rsplit(":", 1)[1]): r for r in rejects}
    for offset, (label, record, fragment) in enumerate(bad):
        reject = by_line[len(good) + offset + 1]
        assert fragment in reject["reason"], f"{label}: {reject['reason']}"
        assert reject["raw"] == (record if isinstance(record, str) else json.dumps(record))
        print(f"  {label:28s} -> {reject['reason']}")


def test_worker_revalidates_what_other_producers_send(stack: RunningWorker) -> None:
    prefix = f"wv{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=stack.info.bootstrap_servers)
    topic = stack.settings.topic_border_seizures
    ok = seizure(event_id=f"{prefix}-ok", occurred_at=_now_iso(700))
    bad = seizure(event_id=f"{prefix}-bad", region="FR-75C", occurred_at=_now_iso(700))
    producer.send(topic, key=b"ML-BKO", value=json.dumps(ok).encode())
    producer.send(topic, key=b"ML-BKO", value=json.dumps(bad).encode())
    producer.send(topic, key=b"ML-BKO", value=b"\xff not json " + prefix.encode())
    # dated 2099 (the schema's bound): past its receipt, so it moves no watermark. Its producer set the record's
    # timestamp (CreateTime) to 2099 too: the receipt is never after the worker's clock, so it is refused anyway.
    future = seizure(event_id=f"{prefix}-future", occurred_at="2099-06-01T10:00:00Z")
    forged = int(datetime(2099, 6, 1, 10, tzinfo=UTC).timestamp() * 1000)
    producer.send(topic, key=b"ML-BKO", value=json.dumps(future).encode(), timestamp_ms=forged)
    producer.flush()
    producer.close()
    wait_until(lambda: _stored(stack, prefix) == 1, 60, "the valid event")
    rejects = stack.wait_rows(
        "SELECT stage, reason, source FROM rejects WHERE event_id IN (%(id)s, %(future)s) OR raw LIKE %(like)s",
        {"id": f"{prefix}-bad", "future": f"{prefix}-future", "like": f"%not json {prefix}%"},
        3,
        "three worker-stage rejects",
    )
    assert {r["stage"] for r in rejects} == {"worker"}
    assert all(r["source"].startswith(f"{topic}:") for r in rejects)
    assert any("belongs to country FR" in r["reason"] for r in rejects)
    assert any("invalid JSON" in r["reason"] for r in rejects)
    assert any(r["reason"].startswith("occurred_at: 2099-06-01T10:00:00+00:00 is ") for r in rejects)
    assert any("after the report was received" in r["reason"] for r in rejects)


def test_a_resent_id_with_changed_content_is_rejected_and_listed_by_rejects(
    stack: RunningWorker, tmp_path: Path
) -> None:
    """Issue 13 §5/§6: the stored report stays; the changed one is refused with a reason the lab can act on,
    and `synthwatch rejects --lab` shows it; the same report sent again is still only a duplicate."""
    prefix = f"cc{uuid.uuid4().hex[:6]}"
    lab_id = f"LAB-{prefix}"
    first = lab(event_id=f"{prefix}-1", lab_id=lab_id, purity_pct=40.0)

    def publish(name: str, record: dict[str, Any]) -> None:
        (tmp_path / name).write_text(ndjson([record]))
        done = run_cli(stack.settings, "publish", str(tmp_path / name))
        assert done.returncode == 0, done.stdout + done.stderr

    publish("first.ndjson", first)
    wait_until(lambda: _stored(stack, prefix) == 1, 60, f"the first report; worker: {stack.stats()}")
    publish("changed.ndjson", {**first, "purity_pct": 80.0})
    publish("again.ndjson", first)
    publish("marker.ndjson", lab(event_id=f"{prefix}-marker", lab_id=lab_id))
    wait_until(lambda: _stored(stack, prefix) == 2, 60, f"the marker; worker: {stack.stats()}")

    def rejects() -> list[tuple[Any, ...]]:
        return stack.query(
            "SELECT event_id, stage, reason, raw FROM rejects WHERE event_id = %(id)s", {"id": f"{prefix}-1"}
        ).rows

    found = wait_until(rejects, 60, "the reject of the changed report")
    assert len(found) == 1, found  # the identical re-send is a duplicate, not a reject
    event_id, stage, reason, raw = found[0]
    assert stage == "worker" and "already stored with different content" in reason and "new event_id" in reason
    assert json.loads(raw)["purity_pct"] == 80.0
    stored = stack.query("SELECT purity_pct FROM lab_detections WHERE event_id = %(id)s", {"id": event_id}).rows
    assert [tuple(r) for r in stored] == [(40.0,)]

    listed = run_cli(stack.settings, "rejects", "--lab", lab_id, "--since", "1d")
    assert listed.returncode == 0, listed.stderr
    assert f"{prefix}-1" in listed.stdout and "already stored with different content" in listed.stdout
    assert listed.stdout.splitlines()[-1] == "1 reject"
    other = run_cli(stack.settings, "rejects", "--lab", f"{lab_id}-other", "--since", "1d")
    assert other.returncode == 0 and other.stdout.splitlines()[-1] == "0 rejects"
