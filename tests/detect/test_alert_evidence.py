"""Alerts say how identity was established and whose reports back them (issue 14, truthful evidence)."""

from __future__ import annotations

from typing import Any

from synthwatch.schemas import Alert, parse_event_object
from synthwatch.stream_apps.detect.intake import Intake
from synthwatch.stream_apps.detect.region import Detector
from tests.support.factories import lab, seizure

MMC_SMILES = "CNC(C)C(=O)c1cccc(C)c1"  # 3-MMC, catalogued
UNKNOWN_SMILES = "CCN(CC)C(=O)c1ccc2[nH]c3ccccc3c2c1"  # a structure the catalogue lacks


def _alerts(records: list[dict[str, Any]]) -> list[Alert]:
    intake, detector = Intake(), Detector()
    alerts: list[Alert] = []
    for record in records:
        alerts.extend(detector.observe_event(intake.enrich(parse_event_object(record), "test")).alerts)
    return alerts


def test_a_name_only_report_of_a_catalogued_drug_says_catalogue_name_not_structure() -> None:
    (alert,) = _alerts([lab(event_id="l-1", substance={"name": "3-MMC"}, lab_id="LAB-FR-07")])
    assert alert.alert_type == "new_substance"
    assert alert.substance.inchikey  # the catalogue fills it in, which is why the old text lied
    assert alert.identified_by == "catalogue_name"
    assert "structure the lab reported" not in alert.summary
    assert "catalogue name" in alert.summary
    assert alert.reported_by == ["LAB-FR-07"]


def test_a_structure_report_says_structure_and_a_seizure_names_its_agency() -> None:
    alerts = _alerts(
        [
            lab(event_id="l-1", substance={"name": "3-MMC", "smiles": MMC_SMILES}, lab_id="LAB-FR-01"),
            seizure(event_id="s-1", substance={"name": "3-MMC"}, occurred_at="2026-03-03T10:00:00Z"),
        ]
    )
    new, first = alerts
    assert (new.alert_type, new.identified_by, new.reported_by) == ("new_substance", "structure", ["LAB-FR-01"])
    assert "identified by the structure the lab reported" in new.summary
    assert (first.alert_type, first.region) == ("first_in_region", "ML-BKO")
    assert (first.identified_by, first.reported_by) == ("catalogue_name", ["Douanes maliennes"])


def test_a_learnt_synonym_and_an_unresolved_name_are_told_apart() -> None:
    alerts = _alerts(
        [
            lab(event_id="l-1", substance={"name": "Zorblex", "smiles": UNKNOWN_SMILES}, lab_id="LAB-FR-01"),
            lab(event_id="l-2", region="FR-69M", substance={"name": "zorblex"}, lab_id="LAB-FR-02"),
            lab(event_id="l-3", substance={"name": "Nothing-Known-9"}, lab_id="LAB-FR-03"),
        ]
    )
    by_event = {a.evidence_event_ids[0]: a for a in alerts}
    assert by_event["l-1"].identified_by == "structure"
    assert (by_event["l-2"].alert_type, by_event["l-2"].identified_by) == ("first_in_region", "learnt_name")
    assert by_event["l-3"].identified_by == "unresolved_name"
    assert "not identified" in by_event["l-3"].summary


def test_the_alerts_table_keeps_how_and_who(ch: Any) -> None:
    from synthwatch.stream_apps.storage.clickhouse import migrate
    from synthwatch.stream_apps.storage.sink import ClickHouseSink

    migrate(ch)
    (alert,) = _alerts([lab(event_id="l-1", substance={"name": "3-MMC"}, lab_id="LAB-FR-07")])
    ClickHouseSink(ch).store_alerts([alert])
    rows = ch.query(
        "SELECT identified_by, reported_by FROM alerts WHERE alert_id = {a:String}", parameters={"a": alert.alert_id}
    ).result_rows
    assert rows == [("catalogue_name", ["LAB-FR-07"])]
