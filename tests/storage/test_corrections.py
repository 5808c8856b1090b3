"""Corrections in ClickHouse: the link old -> new (migration 0011), the batched look-ups, the analysts' read."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from typer.testing import CliRunner

from synthwatch.cli.main import app
from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.intake import EnrichedEvent, Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.corrections import alerts_citing, stored_reports
from synthwatch.stream_apps.storage.deliveries import DeliveryStore
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from synthwatch.stream_apps.storage.tables import Attempt
from tests.support.delivery_helpers import make_alert
from tests.support.factories import lab, seizure


def _events(*records: dict[str, Any]) -> list[EnrichedEvent]:
    result = Intake().process([RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)])
    assert not result.rejects
    return result.events


def test_a_correction_is_a_new_row_and_marks_the_old_one(ch: Any, ch_settings: Settings, monkeypatch: Any) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    now = datetime.now(UTC).isoformat()
    sink.store_events(
        _events(
            lab(event_id="L-1", occurred_at=now, substance={"name": "isotonitazene"}),
            seizure(event_id="S-1", occurred_at=now),
            lab(event_id="L-9", occurred_at=now, lab_id="LAB-OTHER"),
        )
    )
    l1, s1, l2 = ("lab:LAB-FR-01", "L-1"), ("agency:Douanes maliennes", "S-1"), ("lab:LAB-FR-01", "L-2")
    # one query per table for every id; unknown ids, and ids of another reporter, are absent
    stored = stored_reports(ch, [l1, s1, ("lab:LAB-FR-01", "L-404"), ("lab:LAB-FR-01", "L-9")])
    assert set(stored) == {l1, s1}
    assert (stored[l1].kind, stored[l1].reporter, stored[l1].corrected_by) == (
        "lab_detection",
        "lab:LAB-FR-01",
        None,
    )
    assert (stored[s1].reporter, stored[s1].quantity) == ("agency:Douanes maliennes", "2.5 kg")

    fixed = _events(
        lab(event_id="L-2", occurred_at=now, corrects="L-1", substance={"name": "protonitazene"}),
        seizure(event_id="S-2", occurred_at=now, corrects="S-1", quantity={"value": 25, "unit": "g"}),
    )
    assert sink.store_events(fixed).stored == 2  # never an overwrite: two new rows
    assert ch.query("SELECT count() FROM lab_detections WHERE event_id = 'L-1'").result_rows[0][0] == 1
    again = stored_reports(ch, [l1, s1, l2])
    assert (again[l1].corrected_by, again[s1].corrected_by, again[l2].corrected_by) == ("L-2", "S-2", None)

    # The analysts' read: the report shows as corrected, and by which id.
    monkeypatch.setenv("SYNTHWATCH_DATA_DIR", str(ch_settings.data_dir))
    monkeypatch.setenv("SYNTHWATCH_CLICKHOUSE_DATABASE", ch_settings.clickhouse_database)
    rows = json.loads(CliRunner().invoke(app, ["corrections", "--format", "json"]).output)
    by_old = {row["corrected"]: row for row in rows}
    assert set(by_old) == {"L-1", "S-1"}
    assert (by_old["L-1"]["corrected_by"], by_old["L-1"]["old_substance"], by_old["L-1"]["new_substance"]) == (
        "L-2",
        "isotonitazene",
        "protonitazene",
    )
    assert (by_old["S-1"]["old_quantity"], by_old["S-1"]["new_quantity"]) == ("2.5 kg", "25 g")
    one = CliRunner().invoke(app, ["corrections", "L-1"]).output
    assert "L-2" in one and "S-1" not in one and "1 corrected report" in one
    assert "is not corrected" in CliRunner().invoke(app, ["corrections", "L-9"]).output


def test_alerts_citing_and_who_received_them(ch: Any) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    cited = make_alert(alert_id="new-1", evidence_event_ids=["L-1", "L-7"])
    sink.store_alerts([cited, make_alert(alert_id="new-2", evidence_event_ids=["L-8"])])
    (found,) = alerts_citing(ch, ["L-1", "L-404"])
    assert (found.alert_id, found.region, found.evidence_event_ids) == ("new-1", "ML-BKO", ("L-1", "L-7"))
    assert found.substance.name == cited.substance.name and found.severity == "critical"
    assert alerts_citing(ch, ["L-404"]) == []

    store = DeliveryStore(ch)
    at = datetime.now(UTC)
    store.record(
        [
            Attempt("new-1", "amadou", "hook", "webhook", "all", 1, "delivered", "", 200, "http://x", at),
            Attempt("new-1", "claire", "mail", "email", "all", 1, "gave_up", "", None, "c@x", at),
            Attempt("new-1", "nadia", "mail", "email", "all", 0, "queued_digest", "", None, "n@x", at),
        ]
    )
    assert store.recipients_of(["new-1", "new-2"]) == {
        "new-1": {("amadou", "hook", "all"), ("nadia", "mail", "all")}  # who gave up was never told
    }


def test_ingest_history_keeps_a_correction_link_in_extra_without_acting_on_it(
    ch: Any, ch_settings: Settings, tmp_path: Any
) -> None:
    """History files are not judged (no reporter check there): `corrects` is kept verbatim, as before it was
    a declared field, and the corrects column stays '' (docs/detection.md, "Corrections")."""
    from synthwatch.stream_apps.storage.backfill.ingest import ingest_history

    migrate(ch)
    path = tmp_path / "history.ndjson"
    records = [lab(event_id="H-1"), lab(event_id="H-2", corrects="H-1"), seizure(event_id="HS-2", corrects="HS-1")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ingest_history(ch_settings, path, progress=False, workers=0, client=ch)
    rows = ch.query(
        "SELECT * FROM (SELECT event_id, corrects, extra FROM lab_detections UNION ALL "
        "SELECT event_id, corrects, extra FROM border_seizures) ORDER BY event_id"
    ).result_rows
    assert [(r[0], r[1], json.loads(r[2])) for r in rows] == [
        ("H-1", "", {}),
        ("H-2", "", {"corrects": "H-1"}),
        ("HS-2", "", {"corrects": "HS-1"}),
    ]


def test_two_reporters_reports_under_one_id_are_looked_up_apart(ch: Any) -> None:
    """Event ids are unique per reporter only: a correction's original is found by (reporter, id), and a
    report is marked corrected only by a correction of its own reporter."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    a, b = ("lab:LAB-A", "2026-000123"), ("lab:LAB-B", "2026-000123")
    theirs = lab(event_id="2026-000123", lab_id="LAB-A", substance={"name": "isotonitazene"})
    mine = lab(event_id="2026-000123", lab_id="LAB-B", region="FR-IDF", substance={"name": "etonitazene"})
    assert sink.store_events(_events(theirs, mine)).stored == 2
    fix = lab(event_id="2026-000124", lab_id="LAB-B", corrects="2026-000123", substance={"name": "protonitazene"})
    assert sink.store_events(_events(fix)).stored == 1
    stored = stored_reports(ch, [a, b])
    assert (stored[a].reporter, stored[a].substance, stored[a].corrected_by) == ("lab:LAB-A", "isotonitazene", None)
    assert (stored[b].reporter, stored[b].substance, stored[b].corrected_by) == (
        "lab:LAB-B",
        "etonitazene",
        "2026-000124",
    )
    assert stored[b].counted is not None and stored[b].counted.region == "FR-IDF"


def test_a_notice_from_a_stored_alert_carries_its_first_detection_as_utc(ch: Any) -> None:
    """The engine gives DateTime64 values back naive; the notice must carry an offset, else the delivery side takes it
    for "not known" and reads every month of deliveries to find whether the corrected alert was held back."""
    from synthwatch.schemas import parse_event_object
    from synthwatch.stream_apps.delivery.service import _detected_since
    from synthwatch.stream_apps.detect.corrections import ReportFacts, correction_notice

    migrate(ch)
    first = datetime(2026, 10, 31, 23, 0, 0, 123000, tzinfo=UTC)
    again = first + timedelta(days=3)  # the same alert raised again (a rebuilt state): its first detection counts
    ClickHouseSink(ch).store_alerts(
        [make_alert(alert_id="new-1", evidence_event_ids=["L-1"], detected_at=at) for at in (again, first)]
    )
    (found,) = alerts_citing(ch, ["L-1"])
    assert found.detected_at == first and found.detected_at.utcoffset() == timedelta(0)
    old = ReportFacts("L-1", "lab_detection", "lab:LAB-FR-01", "isotonitazene")
    new = parse_event_object(lab(event_id="L-2", corrects="L-1", substance={"name": "protonitazene"}))
    notice = correction_notice(found, old, new, "protonitazene", first + timedelta(days=40))
    assert notice.details["corrected_detected_at"] == first.isoformat()
    assert _detected_since([notice], first + timedelta(days=40)) == first
