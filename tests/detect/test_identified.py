"""One substance, one new-substance alert: a name alerted on its own, then tied to a structure by a lab report.

A name-only seizure of a never-seen name is a correct "new substance" (by name, unidentified). When a lab later
reports a structure under that name, the structure's first alert is ``identified`` (naming the name key), not a
second "never seen". In the other order the name is learnt first and the seizure joins the structure. The worker
reads the lab and seizure topics in either order, so both must hold.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from synthwatch.schemas import Alert
from synthwatch.stream_apps.delivery.messages import render_alert
from synthwatch.stream_apps.detect.identity import SubstanceResolver
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.novelty import SubstanceState
from synthwatch.stream_apps.detect.region import Detector
from tests.support.factories import lab, seizure

NAME = "3-Me-4-F-α-PipPP"
NAME_KEY = "name:3me4fαpippp"
SMILES = "CC(N1CCCCC1)C(=O)c1ccc(F)c(C)c1"  # not in the catalogue
LAB = lab(event_id="lab-1", occurred_at="2026-11-29T13:18:07Z", substance={"name": NAME, "smiles": SMILES})
SEIZURE = seizure(event_id="sz-1", occurred_at="2026-12-01T20:28:14+01:00", substance={"name": NAME})
LATER = seizure(event_id="sz-2", occurred_at="2026-12-02T10:00:00+01:00", substance={"name": NAME})


def detect(
    records: list[dict[str, Any]], corroboration: int = 1, resolver: SubstanceResolver | None = None
) -> list[Alert]:
    """The pure core (intake, region and novelty stages) over ``records`` in this order."""
    intake = Intake(resolver or SubstanceResolver(corroboration=corroboration), stage="backtest")
    detector = Detector()
    alerts: list[Alert] = []
    for n, record in enumerate(records):
        for item in intake.process([RawMessage(f"t:{n}", json.dumps(record, ensure_ascii=False))]).events:
            alerts.extend(detector.observe_event(item).alerts)
    return alerts


def kinds(alerts: list[Alert]) -> list[tuple[str, str, str | None]]:
    return [(a.alert_type, a.substance.key, a.region) for a in alerts]


@pytest.mark.parametrize("corroboration", [1, 2])
def test_a_name_alerted_alone_then_identified_by_a_structure_is_one_new_substance(corroboration: int) -> None:
    alerts = detect([SEIZURE, LAB], corroboration)
    structure = next(a.substance.key for a in alerts if not a.substance.key.startswith("name:"))
    assert kinds(alerts) == [("new_substance", NAME_KEY, "ML-BKO"), ("identified", structure, "FR-75C")]
    identified = alerts[1]
    assert identified.details["name_key"] == NAME_KEY and identified.details["structure_new"] is True
    assert identified.evidence_event_ids == ["lab-1"] and identified.severity == "warning"  # a structure, not a name
    assert "never-seen" in identified.summary and NAME_KEY in identified.summary
    assert identified.similar_substances, "the structure's first alert shows its nearest known substances"


@pytest.mark.parametrize("corroboration", [1, 2])
def test_the_name_learnt_first_makes_the_seizure_join_the_structure(corroboration: int) -> None:
    alerts = detect([LAB, SEIZURE], corroboration)
    structure = alerts[0].substance.key
    assert kinds(alerts) == [("new_substance", structure, "FR-75C"), ("first_in_region", structure, "ML-BKO")]


def test_later_name_only_reports_join_the_structure_and_nothing_is_identified_twice() -> None:
    alerts = detect(
        [
            SEIZURE,
            LAB,
            LATER,
            lab(event_id="lab-2", occurred_at="2026-12-03T09:00:00Z", substance={"name": NAME, "smiles": SMILES}),
        ]
    )
    assert [a.alert_type for a in alerts] == ["new_substance", "identified"]
    # ML-BKO was alerted under the name key: the later seizure there is no first appearance of the structure
    assert alerts[1].details["name_regions"] == ["ML-BKO"]


def test_a_region_never_seen_under_the_name_is_still_a_first_appearance() -> None:
    elsewhere = seizure(
        event_id="sz-3", occurred_at="2026-12-02T10:00:00+01:00", region="ML-1", substance={"name": NAME}
    )
    alerts = detect([SEIZURE, LAB, elsewhere])
    assert [(a.alert_type, a.region) for a in alerts][1:] == [("identified", "FR-75C"), ("first_in_region", "ML-1")]


def test_a_known_structure_tied_to_a_name_alerted_alone_is_a_follow_up() -> None:
    first = lab(event_id="lab-0", occurred_at="2026-11-20T09:00:00Z", substance={"name": "PipPP-X", "smiles": SMILES})
    alerts = detect([first, SEIZURE, LAB])
    structure = alerts[0].substance.key
    assert kinds(alerts) == [
        ("new_substance", structure, "FR-75C"),
        ("new_substance", NAME_KEY, "ML-BKO"),
        ("identified", structure, "FR-75C"),
    ]
    assert alerts[2].details["structure_new"] is False and alerts[2].details["network_first_day"] == "2026-11-20"


def test_a_restarted_resolver_still_knows_the_names_stored_alone() -> None:
    """learn_names replays the stored ``name:`` keys (note_unresolved): the lab after the restart still says so."""
    resolver = SubstanceResolver()
    resolver.note_unresolved(NAME_KEY, "ML-BKO")
    found = resolver.resolve(NAME, smiles=SMILES)
    assert (found.formerly, found.formerly_regions) == (NAME_KEY, ("ML-BKO",))
    assert resolver.resolve(NAME, smiles=SMILES).formerly is None, "once"
    learnt = SubstanceResolver()
    learnt.resolve(NAME, smiles=SMILES)
    learnt.note_unresolved(NAME_KEY)  # stored before the name was learnt: nothing left to tie
    assert learnt.resolve(NAME, smiles=SMILES).formerly is None


def test_the_names_a_substance_was_identified_under_are_kept_in_its_record() -> None:
    state = SubstanceState(first_region="FR-75C", first_day=20000, names=[NAME_KEY], named_regions=["ML-BKO"])
    assert SubstanceState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    plain = SubstanceState(first_region="FR-75C", first_day=20000)
    assert "n" not in plain.to_dict(), "records without names are written as before"
    assert SubstanceState.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize("language", ["en", "fr", "ar"])
def test_the_identified_alert_is_delivered_in_every_language(language: str) -> None:
    alert = detect([SEIZURE, LAB])[1]
    message = render_alert(alert, language, "https://grafana.example")
    assert NAME_KEY in message.text and NAME_KEY in message.html
    assert alert.alert_id in message.text
