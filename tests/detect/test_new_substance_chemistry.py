"""New-substance alerts that help the chemist (issue 16): nearest known substances, family guess, "did you mean".

Pure pipeline tests (intake -> detector, as the backtest and the worker run it), the alerts table, and one
end-to-end run through the real broker, worker and ClickHouse: a structure never seen anywhere raises an alert
that carries its neighbours.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from synthwatch.producers.publisher import Publisher
from synthwatch.producers.readers import InputRecord
from synthwatch.schemas import Alert, parse_event_object
from synthwatch.schemas.topics import Sighting
from synthwatch.stack.broker import EmbeddedBroker
from synthwatch.stream_apps.detect import similarity
from synthwatch.stream_apps.detect.identity import structure_from_smiles
from synthwatch.stream_apps.detect.intake import Intake
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from synthwatch.stream_apps.detect.region import Detector
from tests.conftest import isolated_settings, ndjson, start_worker, stop_worker
from tests.support.factories import lab, seizure

# Etonitazene with a propyl linker, and with a butyl one: no SMARTS pattern matches either (it wants 2-aminoethyl).
HOMO_ETONITAZENE = "CCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCCN(CC)CC)cc1"
BISHOMO_ETONITAZENE = "CCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCCCN(CC)CC)cc1"
MMC_SMILES = "CNC(C)C(=O)c1cccc(C)c1"  # 3-MMC, catalogued


def _alerts(records: list[dict[str, Any]], detector: Detector | None = None) -> list[Alert]:
    intake, detector = Intake(), detector or Detector()
    alerts: list[Alert] = []
    for record in records:
        alerts.extend(detector.observe_event(intake.enrich(parse_event_object(record), "test")).alerts)
    return alerts


def test_a_never_seen_structure_names_its_relatives_and_a_family_guess() -> None:
    (alert,) = _alerts([lab(event_id="l-1", substance={"smiles": HOMO_ETONITAZENE}, lab_id="LAB-FR-01")])
    assert alert.alert_type == "new_substance" and alert.substance.family is None
    names = [n.name for n in alert.similar_substances]
    assert names[:3] == ["Etonitazene", "Butonitazene", "Protonitazene"]
    top = alert.similar_substances[0]
    assert (top.family, top.controlled, top.catalogued) == ("nitazene", True, True)
    assert 0.85 < top.score < 1.0
    assert [n.score for n in alert.similar_substances] == sorted(
        (n.score for n in alert.similar_substances), reverse=True
    )
    assert alert.family_guess is not None
    assert (alert.family_guess.family, alert.family_guess.nearest) == ("nitazene", "Etonitazene")
    assert alert.family_guess.score == top.score
    assert alert.did_you_mean == []
    assert alert.severity == "warning"  # a guess never raises the severity: only a SMARTS match classifies


def test_alerts_rank_against_the_catalogue_so_what_a_worker_met_before_changes_no_alert() -> None:
    """A structure met earlier is not a neighbour in an alert: a worker that restarted (and replays) or that owns
    other partitions has not met it, and the alert must be the same either way (tests/detect/test_replay.py)."""
    first = lab(event_id="l-1", substance={"name": "Homo-eto", "smiles": HOMO_ETONITAZENE}, lab_id="LAB-FR-01")
    second = lab(event_id="l-2", region="FR-69M", substance={"smiles": BISHOMO_ETONITAZENE}, lab_id="LAB-FR-02")
    after_first = [a for a in _alerts([first, second]) if a.alert_type == "new_substance"][1]
    alone = next(a for a in _alerts([second]) if a.alert_type == "new_substance")
    assert after_first.similar_substances == alone.similar_substances and alone.similar_substances
    assert after_first.family_guess == alone.family_guess is not None
    assert all(n.catalogued for n in after_first.similar_substances)
    assert "Homo-eto" not in {n.name for n in after_first.similar_substances}


def test_a_structure_first_known_by_its_inchikey_then_by_its_smiles_changes_no_alert() -> None:
    structure = structure_from_smiles(HOMO_ETONITAZENE)
    assert not isinstance(structure, str) and structure.inchikey
    detector = Detector()
    alerts = _alerts(
        [
            lab(event_id="l-1", substance={"name": "Homo-eto", "inchikey": structure.inchikey}, lab_id="LAB-FR-01"),
            lab(event_id="l-2", region="FR-69M", substance={"smiles": HOMO_ETONITAZENE}, lab_id="LAB-FR-02"),
            lab(event_id="l-3", region="FR-75C", substance={"smiles": BISHOMO_ETONITAZENE}, lab_id="LAB-FR-03"),
        ],
        detector,
    )
    assert [(a.alert_type, a.evidence_event_ids) for a in alerts] == [
        ("new_substance", ["l-1"]),
        ("first_in_region", ["l-2"]),  # its SMILES arriving later changes no alert
        ("new_substance", ["l-3"]),
    ]
    assert alerts[0].similar_substances == []  # an InChIKey has no atoms to compare
    assert alerts[2].similar_substances and all(n.catalogued for n in alerts[2].similar_substances)


def test_a_catalogued_drug_reported_by_name_gets_its_catalogue_structures_neighbours() -> None:
    (alert,) = _alerts([lab(event_id="l-1", substance={"name": "3-MMC"}, lab_id="LAB-FR-07")])
    assert alert.identified_by == "catalogue_name"
    assert [n.name for n in alert.similar_substances][:3] == ["3-CMC", "Mephedrone", "4-CMC"]
    assert alert.family_guess is None  # classified by SMARTS: nothing to guess


def test_an_unresolved_name_gets_did_you_mean_from_the_catalogue() -> None:
    (alert,) = _alerts([lab(event_id="l-1", substance={"name": "isotonitazen"}, lab_id="LAB-FR-03")])
    assert alert.identified_by == "unresolved_name"
    assert alert.did_you_mean[0] == "Isotonitazene"
    assert len(alert.did_you_mean) == len(set(alert.did_you_mean)) <= 3
    assert alert.similar_substances == [] and alert.family_guess is None
    # a synonym spelt wrong names its substance by the catalogue name
    (typo,) = _alerts([lab(event_id="l-2", substance={"name": "mefedrone"}, lab_id="LAB-FR-03")])
    assert typo.did_you_mean[0] == "Mephedrone"


def test_only_new_substance_alerts_carry_the_chemistry() -> None:
    alerts = _alerts(
        [
            lab(event_id="l-1", substance={"name": "3-MMC", "smiles": MMC_SMILES}, lab_id="LAB-FR-01"),
            seizure(event_id="s-1", substance={"name": "3-MMC"}, occurred_at="2026-03-03T10:00:00Z"),
        ]
    )
    new, first = alerts
    assert new.similar_substances and first.alert_type == "first_in_region"
    assert (first.similar_substances, first.family_guess, first.did_you_mean) == ([], None, [])


def test_fingerprints_are_computed_once_per_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    detector = Detector()
    index = detector.novelty.similarity  # the catalogue's fingerprints, made once here
    calls: list[str] = []
    real = similarity.fingerprint

    def counting(smiles: str) -> Any:
        calls.append(smiles)
        return real(smiles)

    monkeypatch.setattr(similarity, "fingerprint", counting)
    records = [
        lab(event_id=f"l-{i}", country=region[:2], region=region, substance={"smiles": HOMO_ETONITAZENE}, lab_id="L")
        for i, region in enumerate(["FR-75C", "FR-69M", "FR-13", "FR-75C"])
    ]
    records.append(lab(event_id="l-9", substance={"name": "3-MMC"}, lab_id="LAB-FR-01"))  # catalogued: indexed
    alerts = _alerts(records, detector)
    assert [a.alert_type for a in alerts].count("new_substance") == 2
    assert calls == [HOMO_ETONITAZENE]  # the new structure once; the catalogue's were made before
    assert len(index) == sum(1 for _ in similarity.shipped_catalogue())  # ranked, never added


def test_the_alerts_table_keeps_neighbours_guess_and_spellings(ch: Any) -> None:
    from synthwatch.stream_apps.storage.clickhouse import migrate
    from synthwatch.stream_apps.storage.sink import ClickHouseSink

    migrate(ch)
    new, unresolved = _alerts(
        [
            lab(event_id="l-1", substance={"smiles": HOMO_ETONITAZENE}, lab_id="LAB-FR-01"),
            lab(event_id="l-2", substance={"name": "isotonitazen"}, lab_id="LAB-FR-03"),
        ]
    )
    ClickHouseSink(ch).store_alerts([new, unresolved])
    rows = dict(
        (row[0], row[1:])
        for row in ch.query("SELECT alert_id, similar_substances, family_guess, did_you_mean FROM alerts").result_rows
    )
    similar, guess, spellings = rows[new.alert_id]
    assert [n["name"] for n in json.loads(similar)] == [n.name for n in new.similar_substances]
    assert json.loads(similar)[0] == new.similar_substances[0].model_dump()
    assert (guess, spellings) == ("nitazene", [])
    assert rows[unresolved.alert_id] == ("", "", unresolved.did_you_mean)


@pytest.mark.integration
@pytest.mark.slow
def test_a_never_seen_structure_streamed_through_the_worker_carries_its_neighbours(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        query = (
            "SELECT substance_key, similar_substances, family_guess FROM alerts WHERE alert_type = 'new_substance' "
            "ORDER BY evidence_event_ids[1]"
        )
        first_report = lab(event_id="e2e-1", substance={"name": "Homo-eto", "smiles": HOMO_ETONITAZENE}, lab_id="L-1")
        second_report = lab(event_id="e2e-2", region="FR-69M", substance={"smiles": BISHOMO_ETONITAZENE}, lab_id="L-2")
        rows: list[dict[str, Any]] = []
        # One after the other: the second alert is raised by a worker that has met the first structure.
        for number, record in enumerate([first_report, second_report], start=1):
            with Publisher(settings, broker.bootstrap_servers) as publisher:
                summary = publisher.publish_records([InputRecord(source=f"e2e:{number}", raw=ndjson([record]))])
            assert summary.sent == 1
            rows = worker.wait_rows(query, {}, number, f"new-substance alert {number}", timeout=90)
    finally:
        stop_worker(worker)
    first, second = (row["similar_substances"] for row in rows)
    first_guess, second_guess = (row["family_guess"] for row in rows)
    assert [n["name"] for n in json.loads(first)][:3] == ["Etonitazene", "Butonitazene", "Protonitazene"]
    assert first_guess == second_guess == "nitazene"
    offline = next(a for a in _alerts([second_report]) if a.alert_type == "new_substance")
    assert json.loads(second) == [n.model_dump() for n in offline.similar_substances]  # as if met alone


# --- structures the network learnt (a separate section, read from the store up to a cut) ---------------------------

# Real N-pyrrolidino nitazenes reported in Europe since 2022, none of them in the catalogue (Etonitazepyne is).
PROTONITAZEPYNE = "CCCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"
METONITAZEPYNE = "COc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"
ISOTONITAZEPYNE = "CC(C)Oc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"
N_ETHYLHEXEDRONE = "CCCCC(NCC)C(=O)c1ccccc1"  # a cathinone: nothing like a nitazene
ETONITAZEPYNE = "CCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"  # catalogued
_AS_OF = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def _key(smiles: str) -> str:
    structure = structure_from_smiles(smiles)
    assert not isinstance(structure, str)
    return structure.key


def _learnt(*named: tuple[str, str]) -> list[similarity.LearntStructure]:
    return [similarity.LearntStructure(_key(smiles), name, smiles, "nitazene") for name, smiles in named]


def _sighting(smiles: str, name: str = "unknown powder", event_id: str = "l-9") -> Sighting:
    structure = structure_from_smiles(smiles)
    assert not isinstance(structure, str)
    return Sighting(
        event_id=event_id,
        kind="lab_detection",
        occurred_at=datetime(2026, 3, 2, 10, 0, tzinfo=UTC),
        day=20514,
        country="FR",
        region="FR-75C",
        key=structure.key,
        name=name,
        inchikey=structure.inchikey,
        family=structure.family,
        controlled=None,
        catalogued=False,
        identified_by="structure",
        smiles=smiles,
    )


def _new_substance(detector: NoveltyDetector, s: Sighting) -> Alert:
    (alert,) = detector.observe(s)
    assert alert.alert_type == "new_substance"
    return alert


def test_a_new_nitazene_analogue_names_the_learnt_ones_nearest_first_and_never_a_catalogue_structure() -> None:
    detector = NoveltyDetector()
    s = _sighting(METONITAZEPYNE)
    alert = _new_substance(detector, s)
    learnt = _learnt(
        ("Protonitazepyne", PROTONITAZEPYNE),
        ("Isotonitazepyne", ISOTONITAZEPYNE),
        ("N-Ethylhexedrone", N_ETHYLHEXEDRONE),
        ("Etonitazepyne (as a lab spelt it)", ETONITAZEPYNE),  # catalogued: the catalogue part names it
        ("Metonitazepyne", METONITAZEPYNE),  # itself, stored already (its own report): never its own neighbour
    )
    with_learnt = detector.with_learnt(alert, s, learnt, _AS_OF)
    section = with_learnt.learnt_substances
    assert section is not None and section.as_of == _AS_OF
    assert [(n.name, n.score) for n in section.substances] == [("Isotonitazepyne", 0.814), ("Protonitazepyne", 0.8)]
    assert all(not n.catalogued and n.controlled is None for n in section.substances)  # no legal status, ever
    # the catalogue part is what observe() made: Etonitazepyne is there, and nothing learnt
    assert with_learnt.similar_substances == alert.similar_substances
    assert alert.similar_substances[0].name == "Etonitazepyne" and all(n.catalogued for n in alert.similar_substances)
    assert with_learnt.model_copy(update={"learnt_substances": None}) == alert


def test_the_learnt_section_depends_on_the_stored_structures_and_the_cut_not_on_the_detector() -> None:
    """A worker that met other structures, a fresh one (a replay, another worker), rows in another order: same."""
    seasoned = NoveltyDetector()
    for number, smiles in enumerate([PROTONITAZEPYNE, ISOTONITAZEPYNE, HOMO_ETONITAZENE]):
        seasoned.observe(_sighting(smiles, event_id=f"l-{number}"))
    s = _sighting(METONITAZEPYNE)
    learnt = _learnt(("Protonitazepyne", PROTONITAZEPYNE), ("Isotonitazepyne", ISOTONITAZEPYNE))
    fresh = NoveltyDetector()
    alert = _new_substance(fresh, s)
    assert seasoned.with_learnt(alert, s, learnt, _AS_OF) == fresh.with_learnt(alert, s, learnt[::-1], _AS_OF)
    # nothing stored before the cut: the section says so (an empty list), it is not left out
    empty = fresh.with_learnt(alert, s, [], _AS_OF).learnt_substances
    assert empty is not None and empty.substances == []


def test_only_new_substances_with_a_structure_get_a_learnt_section() -> None:
    detector = NoveltyDetector()
    learnt = _learnt(("Protonitazepyne", PROTONITAZEPYNE))
    s = _sighting(METONITAZEPYNE)
    _new_substance(detector, s)
    elsewhere = replace(s, region="FR-69M", event_id="l-10")
    (first_in_region,) = detector.observe(elsewhere)
    assert first_in_region.alert_type == "first_in_region"
    assert detector.with_learnt(first_in_region, elsewhere, learnt, _AS_OF) == first_in_region
    unresolved = replace(
        s, key="name:blue lotus", inchikey=None, family=None, smiles=None, identified_by="unresolved_name"
    )
    other = NoveltyDetector()
    alert = _new_substance(other, unresolved)
    assert other.with_learnt(alert, unresolved, learnt, _AS_OF).learnt_substances is None
