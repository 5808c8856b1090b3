"""Small builders of valid wire records for tests (each test changes what it is about)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from synthwatch.schemas.topics import Sighting

SEIZURE: dict[str, Any] = {
    "event_id": "s-1",
    "kind": "border_seizure",
    "occurred_at": "2026-03-01T10:00:00+01:00",
    "country": "ML",
    "region": "ML-BKO",
    "substance": {"name": "Tramadol"},
    "agency": "Douanes maliennes",
    "seizure_id": "BKO-2026-001",
    "border_point": "Bamako-Sénou airport",
    "conveyance": "air",
    "quantity": {"value": 2.5, "unit": "kg"},
}

LAB: dict[str, Any] = {
    "event_id": "l-1",
    "kind": "lab_detection",
    "occurred_at": "2026-03-02T09:00:00Z",
    "country": "FR",
    "region": "FR-75C",
    "substance": {"name": "3-MMC", "smiles": "CNC(C)C(=O)c1cccc(C)c1.Cl"},
    "lab_id": "LAB-FR-01",
    "sample_id": "S-0001",
    "sample_type": "seized_material",
    "method": "GC-MS",
    "purity_pct": 71.5,
}


def seizure(**changes: Any) -> dict[str, Any]:
    record = copy.deepcopy(SEIZURE)
    record.update(changes)
    return record


def lab(**changes: Any) -> dict[str, Any]:
    record = copy.deepcopy(LAB)
    record.update(changes)
    return record


# One record per kind of malformed input the foundation issue names, with a word its reason must contain.
MALFORMED: list[tuple[str, str, str]] = [
    ("truncated JSON", '{"event_id": "m-trunc", "kind": "border_sei', "invalid JSON"),
    ("bad region", "REGION_BAD", "region"),
    ("region of another country", "REGION_OTHER", "belongs to country FR"),
    ("negative quantity", "NEG_QTY", "quantity.value"),
    ("unknown kind", "UNKNOWN_KIND", "unknown kind"),
    ("blank substance", "BLANK_SUBSTANCE", "substance.name"),
    ("naive timestamp", "NAIVE_TS", "timezone"),
]


def alike_numbered_reports() -> list[dict[str, Any]]:
    """Two labs' reports and two agencies' seizures, each pair under one event id, place and time (a date-only
    sample date is midnight; LIMS number alike): four reports, since event ids are unique per reporter only."""
    place = {"country": "ML", "region": "ML-BKO", "occurred_at": "2026-03-03T00:00:00Z"}
    return [
        lab(event_id="2026-000123", lab_id="LAB-A", **place),
        lab(event_id="2026-000123", lab_id="LAB-B", **place),
        seizure(event_id="z-1", agency="Douane ML", **place),
        seizure(event_id="z-1", agency="Douane SN", **place),
    ]


def malformed_records(prefix: str) -> list[tuple[str, str | dict[str, Any], str]]:
    """(label, record, expected reason fragment) for every malformed kind, ids prefixed."""
    builders: dict[str, dict[str, Any]] = {
        "REGION_BAD": seizure(event_id=f"{prefix}-m-region", region="ML-ZZZ"),
        "REGION_OTHER": seizure(event_id=f"{prefix}-m-other", region="FR-75C"),
        "NEG_QTY": seizure(event_id=f"{prefix}-m-neg", quantity={"value": -3, "unit": "g"}),
        "UNKNOWN_KIND": seizure(event_id=f"{prefix}-m-kind", kind="wastewater_sample"),
        "BLANK_SUBSTANCE": seizure(event_id=f"{prefix}-m-blank", substance={"name": "   "}),
        "NAIVE_TS": seizure(event_id=f"{prefix}-m-naive", occurred_at="2026-03-01T10:00:00"),
    }
    out: list[tuple[str, str | dict[str, Any], str]] = []
    for label, record, fragment in MALFORMED:
        out.append((label, builders.get(record, record.replace("m-trunc", f"{prefix}-m-trunc")), fragment))
    return out


def sighting(**changes: Any) -> Sighting:
    """A sighting of the sightings topic: an uncatalogued substance seen in FR-75C (no structure to compare)."""
    fields: dict[str, Any] = {
        "event_id": "l-1",
        "kind": "lab_detection",
        "occurred_at": datetime(2026, 3, 2, 10, 0, tzinfo=UTC),
        "day": 20514,
        "country": "FR",
        "region": "FR-75C",
        "key": "NOVELSUBSTANCE",
        "name": "unknown powder",
        "inchikey": None,
        "family": None,
        "controlled": None,
        "catalogued": False,
    }
    return Sighting(**{**fields, **changes})
