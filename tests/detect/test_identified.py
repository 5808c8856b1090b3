"""One substance, one new-substance alert: a name alerted on its own, then tied to a structure by a lab report.

A name-only seizure of a never-seen name is a correct "new substance" (by name, unidentified, info). When a lab
later reports a structure under that name and settles it, a structure new to the network is still a
``new_substance`` (its own severity) whose details and summary name the name key; a structure known already gets
an ``identified`` follow-up at info. In the other order the name is learnt first and the seizure joins the
structure. The worker reads the lab and seizure topics in either order, so both must hold.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from synthwatch.schemas import Alert
from synthwatch.stream_apps.delivery.messages import render_alert
from synthwatch.stream_apps.delivery.subscriptions import Route
from synthwatch.stream_apps.detect.identity import NAME_LINK_REGIONS, SubstanceResolver, name_key
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


LAB_B = lab(
    event_id="lab-b",
    occurred_at="2026-11-30T09:00:00Z",
    lab_id="LAB-DE-09",
    sample_id="S-9",
    substance={"name": NAME, "smiles": SMILES},
)  # a second lab (another reporter): with corroboration 2 it settles the name
OTHER = "CC(NC)C(=O)c1ccc(Cl)c(C)c1"  # another uncatalogued structure
THERE = lab(
    event_id="lab-ml",
    occurred_at="2026-12-10T09:00:00Z",
    region="ML-BKO",
    country="ML",
    sample_id="S7",
    substance={"name": "unknown powder", "smiles": SMILES},
)  # a lab report of the structure, under another name, in the region the name was seized in


def test_a_new_structure_first_reported_by_name_is_a_new_substance_that_names_the_name() -> None:
    """Decision A: a structure new to the network is a new_substance at its own severity, whatever its name had;
    the link (name key, regions, first day) is in its details and one sentence of its summary."""
    alerts = detect([SEIZURE, LAB])
    structure = alerts[1].substance.key
    assert kinds(alerts) == [("new_substance", NAME_KEY, "ML-BKO"), ("new_substance", structure, "FR-75C")]
    found = alerts[1]
    assert found.severity == "warning" and found.evidence_event_ids == ["lab-1"]
    assert found.details["name_key"] == NAME_KEY and found.details["name_regions"] == ["ML-BKO"]
    assert found.details["name_first_day"] == "2026-12-01"
    assert f"The name {NAME_KEY.removeprefix('name:')} ({NAME_KEY}) was reported by name only" in found.summary
    assert found.similar_substances, "the structure's first alert shows its nearest known substances"
    plain = detect([LAB])[0]
    assert found.alert_id == plain.alert_id, "the same new_substance alert as without the name (same id)"


def test_with_corroboration_only_the_settling_report_links_and_a_known_structure_gets_an_info_follow_up() -> None:
    """Decision B: the first lab's binding is provisional (no link); the second reporter settles it, and K is known
    by then: an ``identified`` follow-up at info."""
    alerts = detect([SEIZURE, LAB, LAB_B], corroboration=2)
    structure = alerts[1].substance.key
    assert kinds(alerts) == [
        ("new_substance", NAME_KEY, "ML-BKO"),
        ("new_substance", structure, "FR-75C"),
        ("identified", structure, "FR-75C"),
    ]
    assert "name_key" not in alerts[1].details, "a provisional binding links nothing"
    follow_up = alerts[2]
    assert follow_up.severity == "info" and follow_up.evidence_event_ids == ["lab-b"]
    assert follow_up.details["name_key"] == NAME_KEY and follow_up.details["structure_new"] is False


def test_a_contested_name_never_links() -> None:
    """Reviewer's exp1: one lab binds N to K1, another reports N as K2: contested, neither is identified."""
    other = {**LAB_B, "occurred_at": "2026-11-30T13:18:07Z", "substance": {"name": NAME, "smiles": OTHER}}
    later = seizure(event_id="sz-9", occurred_at="2026-12-05T10:00:00+01:00", seizure_id="X9", substance={"name": NAME})
    alerts = detect([SEIZURE, LAB, other, later], corroboration=2)
    assert [a.alert_type for a in alerts] == ["new_substance"] * 3
    assert all("name_key" not in a.details for a in alerts)


def test_a_name_only_report_older_than_the_horizon_takes_nothing_from_a_new_structure() -> None:
    """Reviewer's exp3: a junk name-only report two years before the lab report does not link; the structure's
    first report in that region is still a first appearance."""
    junk = seizure(event_id="sz-junk", occurred_at="2024-01-01T10:00:00+01:00", substance={"name": NAME})
    alerts = detect([junk, LAB, THERE])
    assert [a.alert_type for a in alerts] == ["new_substance", "new_substance", "first_in_region"]
    assert "name_key" not in alerts[1].details


def test_the_horizon_is_measured_from_the_structure_report() -> None:
    resolver = SubstanceResolver(name_horizon_days=30)
    resolver.resolve(NAME, region="ML-BKO", occurred_at=datetime(2026, 10, 1, tzinfo=UTC))
    assert resolver.resolve(NAME, smiles=SMILES, occurred_at=datetime(2026, 11, 1, tzinfo=UTC)).formerly is None
    resolver = SubstanceResolver(name_horizon_days=30)
    resolver.resolve(NAME, region="ML-BKO", occurred_at=datetime(2026, 10, 1, tzinfo=UTC))
    found = resolver.resolve(NAME, smiles=SMILES, occurred_at=datetime(2026, 10, 31, tzinfo=UTC))
    assert (found.formerly, found.formerly_regions, found.formerly_since) == (NAME_KEY, ("ML-BKO",), "2026-10-01")


def test_remembered_names_are_bounded_by_event_time_and_regions() -> None:
    """Finding 8: a name not reported for twice the horizon before the latest report is dropped, and at most
    NAME_LINK_REGIONS regions (the first in code order) are kept per name."""
    resolver = SubstanceResolver(name_horizon_days=30)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(NAME_LINK_REGIONS + 8):
        resolver.resolve(NAME, region=f"R{n:03d}", occurred_at=start)
    resolver.resolve("junk-1", region="ML-BKO", occurred_at=start)
    kept = resolver.unresolved_names()
    assert sorted(kept[name_key(NAME)]) == [f"R{n:03d}" for n in range(NAME_LINK_REGIONS)]
    resolver.resolve("junk-2", region="ML-BKO", occurred_at=start + timedelta(days=61))
    assert set(resolver.unresolved_names()) == {"junk2"}


def test_a_structure_bearing_report_in_a_region_alerted_under_the_name_is_a_first_appearance() -> None:
    """Decision E: only name-only reports of K (resolved through the name) join silently where the name was
    alerted; a report with the structure there is K's first appearance."""
    alerts = detect([SEIZURE, LAB, THERE])
    assert [(a.alert_type, a.region) for a in alerts][2:] == [("first_in_region", "ML-BKO")]


def test_later_name_only_reports_join_the_structure_and_nothing_is_linked_twice() -> None:
    """A name-only report in a region alerted under the name is still the structure's first appearance there:
    the name's alert was information only, and one junk name-only report must never silence a real one."""
    alerts = detect(
        [
            SEIZURE,
            LAB,
            LATER,
            lab(event_id="lab-2", occurred_at="2026-12-03T09:00:00Z", substance={"name": NAME, "smiles": SMILES}),
        ]
    )
    assert [a.alert_type for a in alerts] == ["new_substance", "new_substance", "first_in_region"]
    assert alerts[1].details["name_regions"] == ["ML-BKO"] and alerts[2].region == "ML-BKO"


def test_a_reused_event_id_from_another_reporter_is_judged_on_its_own() -> None:
    """Event ids are unique per reporter only: another lab's report under the id of the report that made a link
    (another name, another structure) gets no link, and its own name is learnt."""
    reused = lab(
        event_id="lab-1",
        occurred_at="2026-11-30T09:00:00Z",
        lab_id="LAB-DE-09",
        sample_id="S-9",
        substance={"name": "blue powder x", "smiles": OTHER},
    )
    later = seizure(event_id="sz-9", occurred_at="2026-12-04T10:00:00+01:00", substance={"name": "blue powder x"})
    alerts = detect([SEIZURE, LAB, reused, later])
    other = [a for a in alerts if a.substance.key not in (NAME_KEY, alerts[1].substance.key)]
    assert [(a.alert_type, "name_key" in a.details) for a in other] == [
        ("new_substance", False),
        ("first_in_region", False),
    ]
    assert other[1].region == "ML-BKO"  # the seizure of the name it taught resolved to its structure


def test_a_region_never_seen_under_the_name_is_still_a_first_appearance() -> None:
    elsewhere = seizure(
        event_id="sz-3", occurred_at="2026-12-02T10:00:00+01:00", region="ML-1", substance={"name": NAME}
    )
    alerts = detect([SEIZURE, LAB, elsewhere])
    assert [(a.alert_type, a.region) for a in alerts][1:] == [("new_substance", "FR-75C"), ("first_in_region", "ML-1")]


def test_a_known_structure_tied_to_a_name_alerted_alone_is_an_info_follow_up() -> None:
    first = lab(event_id="lab-0", occurred_at="2026-11-20T09:00:00Z", substance={"name": "PipPP-X", "smiles": SMILES})
    alerts = detect([first, SEIZURE, LAB])
    structure = alerts[0].substance.key
    assert kinds(alerts) == [
        ("new_substance", structure, "FR-75C"),
        ("new_substance", NAME_KEY, "ML-BKO"),
        ("identified", structure, "FR-75C"),
    ]
    assert alerts[2].details["structure_new"] is False and alerts[2].details["network_first_day"] == "2026-11-20"
    assert alerts[2].severity == "info" and "Not a new substance" in alerts[2].summary


def test_the_follow_up_of_a_known_opioid_is_info_not_critical() -> None:
    """Reviewer's exp6 (finding 4): fentanyl known since 2025, a street name tied to it: info, not critical."""
    fentanyl = "CCC(=O)N(c1ccccc1)C1CCN(CCc2ccccc2)CC1"
    alerts = detect(
        [
            lab(event_id="l0", occurred_at="2025-01-01T09:00:00Z", substance={"name": "fentanyl", "smiles": fentanyl}),
            seizure(event_id="s1", occurred_at="2026-11-01T10:00:00+01:00", substance={"name": "China White X"}),
            lab(
                event_id="l1",
                occurred_at="2026-11-02T09:00:00Z",
                sample_id="S2",
                substance={"name": "China White X", "smiles": fentanyl},
            ),
        ]
    )
    assert [(a.alert_type, a.severity) for a in alerts] == [
        ("new_substance", "critical"),
        ("new_substance", "info"),
        ("identified", "info"),
    ]


def test_a_restarted_resolver_still_knows_the_names_stored_alone() -> None:
    """learn_names replays the stored ``name:`` keys (note_unresolved): the lab after the restart still says so."""
    resolver = SubstanceResolver()
    at = datetime(2026, 12, 1, tzinfo=UTC)
    resolver.note_unresolved(NAME_KEY, "ML-BKO", at, at)
    found = resolver.resolve(NAME, smiles=SMILES, occurred_at=at)
    assert (found.formerly, found.formerly_regions, found.formerly_since) == (NAME_KEY, ("ML-BKO",), "2026-12-01")
    assert resolver.resolve(NAME, smiles=SMILES).formerly is None, "once"
    learnt = SubstanceResolver()
    learnt.resolve(NAME, smiles=SMILES)
    learnt.note_unresolved(NAME_KEY)  # stored before the name was learnt: nothing left to tie
    assert learnt.resolve(NAME, smiles=SMILES).formerly is None


def test_names_are_kept_sorted_live() -> None:
    """Finding 7: the rebuild writes them sorted; live must too, so the records are byte-identical."""
    state = SubstanceState(first_region="FR-75C", first_day=20000)
    state.add_name("name:zeta", ["ML-BKO"])
    state.add_name("name:alpha", ["FR-13"])
    assert state.names == ["name:alpha", "name:zeta"] and state.named_regions == ["FR-13", "ML-BKO"]


def test_the_names_a_substance_was_identified_under_are_kept_in_its_record() -> None:
    state = SubstanceState(first_region="FR-75C", first_day=20000, names=[NAME_KEY], named_regions=["ML-BKO"])
    assert SubstanceState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    plain = SubstanceState(first_region="FR-75C", first_day=20000)
    assert not {"n", "nr"} & set(plain.to_dict()), "records without names are written as before"
    assert SubstanceState.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize("language", ["en", "fr", "ar"])
def test_the_link_and_the_follow_up_are_delivered_in_every_language(language: str) -> None:
    new = detect([SEIZURE, LAB])[1]
    message = render_alert(new, language, "https://grafana.example")
    name = NAME_KEY.removeprefix("name:")  # the name as resolved, not the internal key
    assert name in message.text and name in message.html and new.alert_id in message.text
    plain = render_alert(detect([LAB])[0], language, "https://grafana.example")
    assert name not in plain.text
    first = lab(event_id="lab-0", occurred_at="2026-11-20T09:00:00Z", substance={"name": "PipPP-X", "smiles": SMILES})
    follow_up = detect([first, SEIZURE, LAB])[2]
    message = render_alert(follow_up, language, "https://grafana.example")
    assert name in message.text and follow_up.alert_id in message.text


def test_a_follow_up_goes_to_routes_of_new_substances_that_take_info() -> None:
    """Finding 9: routing of ``identified`` (subscriptions.Route._follows_up)."""
    first = lab(event_id="lab-0", occurred_at="2026-11-20T09:00:00Z", substance={"name": "PipPP-X", "smiles": SMILES})
    follow_up = detect([first, SEIZURE, LAB])[2]
    channel = {"type": "email", "to": "duty@agency.example"}
    takes = Route.model_validate({"alert_types": ["new_substance"], "min_severity": "info", "channel": channel})
    warning_up = Route.model_validate({"alert_types": ["new_substance"], "min_severity": "warning", "channel": channel})
    spikes = Route.model_validate({"alert_types": ["spike"], "min_severity": "info", "channel": channel})
    assert (takes.matches(follow_up), warning_up.matches(follow_up), spikes.matches(follow_up)) == (True, False, False)


def test_a_batch_read_again_keeps_the_link() -> None:
    """Finding 6: the runtime may throw a resolved batch away (partition revoked) and read it again; the report
    that made the link makes it again (same event id), and only that report."""
    intake, detector = Intake(SubstanceResolver(), stage="backtest"), Detector()
    alerts: list[Alert] = []
    for item in intake.process([RawMessage("t:0", json.dumps(SEIZURE, ensure_ascii=False))]).events:
        alerts.extend(detector.observe_event(item).alerts)
    intake.process([RawMessage("t:1", json.dumps(LAB, ensure_ascii=False))])  # thrown away
    for item in intake.process([RawMessage("t:1", json.dumps(LAB, ensure_ascii=False))]).events:
        alerts.extend(detector.observe_event(item).alerts)
    assert [a.alert_type for a in alerts] == ["new_substance", "new_substance"]
    assert alerts[1].details["name_key"] == NAME_KEY
    other = lab(event_id="lab-9", occurred_at="2026-11-30T09:00:00Z", sample_id="S9", substance=LAB["substance"])
    assert [e.substance.formerly for e in intake.process([RawMessage("t:2", json.dumps(other))]).events] == [None]


def test_the_settling_report_reaches_novelty_when_its_structure_was_sighted_there_that_day() -> None:
    """Finding 9: the region stage forwards the linking report's sighting even when K was sighted in that region
    on that day already (it would otherwise send nothing, and the follow-up would never be raised)."""
    same_day = lab(
        event_id="lab-0",
        occurred_at="2026-11-29T08:00:00Z",
        sample_id="S0",
        substance={"name": "PipPP-X", "smiles": SMILES},
    )
    alerts = detect([same_day, SEIZURE, LAB])
    assert [(a.alert_type, a.region) for a in alerts] == [
        ("new_substance", "FR-75C"),
        ("new_substance", "ML-BKO"),
        ("identified", "FR-75C"),
    ]
