"""Who may correct a report (hostile input: ``corrects`` comes from outside) and what the notice says."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from synthwatch.schemas.records import AlertSubstance
from synthwatch.schemas.reject_reasons import reject_reason
from synthwatch.stream_apps.detect.corrections import (
    CitedAlert,
    Counted,
    ReportFacts,
    correction_notice,
    counted_of,
    facts_of,
    judge_corrections,
    known_reports,
    notice_id,
    rests_on,
)
from synthwatch.stream_apps.detect.intake import EnrichedEvent, Intake, RawMessage
from tests.support.factories import lab, seizure


def _items(*records: dict[str, Any], org: str | None = None) -> list[EnrichedEvent]:
    result = Intake().process([RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)])
    assert not result.rejects, result.rejects
    for item in result.events:
        item.org = org
    return result.events


def _claim(reporter: str) -> str:
    return reporter  # no keys file: the claim is the organisation


ORIGINAL = ReportFacts("L-1", "lab_detection", "lab:LAB-FR-01", "isotonitazene")
L1, S1 = ("lab:LAB-FR-01", "L-1"), ("agency:Douanes maliennes", "S-1")  # (reporter, event id)


def test_the_reporter_of_a_stored_report_may_correct_it() -> None:
    items = _items(lab(event_id="L-2", corrects="L-1", substance={"name": "protonitazene"}))
    known = {L1: ORIGINAL}
    judged = judge_corrections(items, known, _claim)
    assert judged.kept == items and judged.rejects == []
    assert known[L1].corrected_by == "L-2"  # the batch's later corrections see it


def test_a_correction_naming_an_unknown_id_is_refused_with_a_reason() -> None:
    (item,) = _items(lab(event_id="L-2", corrects="L-404"))
    judged = judge_corrections([item], {}, _claim)
    assert judged.kept == []
    (reject,) = judged.rejects
    assert reject.reason.startswith("corrects: event_id 'L-404' is not stored (yet)")
    assert (reject.stage, reject.event_id, reject.source) == ("worker", "L-2", "t:0:0")
    assert reject_reason(reject.reason) == "invalid_corrects"  # a bounded metric label


def test_another_lab_may_not_correct_a_report() -> None:
    (item,) = _items(lab(event_id="L-9", lab_id="LAB-EVIL", corrects="L-1"))
    judged = judge_corrections([item], {L1: ORIGINAL}, _claim)
    (reject,) = judged.rejects
    assert "is not stored (yet) as a report of this lab (lab_id)" in reject.reason
    assert "LAB-FR-01" not in reject.reason  # the refusal does not tell who the reporter is
    assert judged.kept == []


def test_another_kind_or_agency_may_not_correct_a_report() -> None:
    (cross,) = _items(seizure(event_id="S-2", corrects="L-1"))
    assert (
        "is not stored (yet) as a report of this agency"
        in judge_corrections([cross], {L1: ORIGINAL}, _claim).rejects[0].reason
    )
    stored = ReportFacts("S-1", "border_seizure", "agency:Douanes maliennes", "Tramadol", "2.5 kg")
    (other,) = _items(seizure(event_id="S-2", agency="Police", corrects="S-1"))
    assert (
        "not stored (yet) as a report of this agency"
        in judge_corrections([other], {S1: stored}, _claim).rejects[0].reason
    )
    (own,) = _items(seizure(event_id="S-3", corrects="S-1"))
    assert judge_corrections([own], {S1: stored}, _claim).kept == [own]


def test_a_signed_correction_must_come_from_the_organisation_of_the_original() -> None:
    organisations = {"lab:LAB-FR-01": "org:labo-paris"}
    (signed,) = _items(lab(event_id="L-2", corrects="L-1"), org="labo-paris")
    assert judge_corrections([signed], {L1: ORIGINAL}, lambda c: organisations.get(c, c)).kept == [signed]
    (forged,) = _items(lab(event_id="L-3", corrects="L-1"), org="labo-lyon")
    judged = judge_corrections([forged], {L1: ORIGINAL}, lambda c: organisations.get(c, c))
    assert judged.kept == [] and "another lab" in judged.rejects[0].reason


def test_corrections_chain_and_never_fork() -> None:
    first, second, fork = _items(
        lab(event_id="L-2", corrects="L-1"), lab(event_id="L-3", corrects="L-2"), lab(event_id="L-4", corrects="L-1")
    )
    known = {L1: ORIGINAL}
    judged = judge_corrections([first, second, fork], known, _claim)
    assert judged.kept == [first, second]  # a correction of a correction, in the same batch
    (reject,) = judged.rejects
    assert "'L-1' is already corrected by 'L-2': correct that report instead" in reject.reason
    # A re-send of the correction itself is not a fork (the sink then finds it stored: a duplicate).
    again = {L1: ReportFacts("L-1", "lab_detection", "lab:LAB-FR-01", "x", corrected_by="L-2")}
    assert judge_corrections([first], again, _claim).kept == [first]


def test_the_original_earlier_in_the_same_batch_counts_the_one_after_does_not() -> None:
    original, correction = _items(lab(event_id="L-1"), lab(event_id="L-2", corrects="L-1"))
    assert judge_corrections([original, correction], {}, _claim).kept == [original, correction]
    judged = judge_corrections([correction, original], {}, _claim)
    assert judged.kept == [original] and "is not stored (yet)" in judged.rejects[0].reason


def test_reports_taken_since_the_checkpoint_count_as_known_and_their_corrections_too() -> None:
    """Not stored yet (the checkpoint is pending): a pending original is known, and a pending correction of a
    stored report marks it, so a second correction of it in a later batch is a fork, refused."""
    pending = _items(lab(event_id="P-1"), lab(event_id="L-2", corrects="L-1"))
    known = known_reports({L1: ORIGINAL}, pending, {("lab:LAB-FR-01", "P-1"), L1})
    assert known[("lab:LAB-FR-01", "P-1")].reporter == "lab:LAB-FR-01" and known[L1].corrected_by == "L-2"
    fork, of_pending = _items(lab(event_id="L-3", corrects="L-1"), lab(event_id="P-2", corrects="P-1"))
    judged = judge_corrections([fork, of_pending], known, _claim)
    assert judged.kept == [of_pending] and "already corrected by 'L-2'" in judged.rejects[0].reason


def test_the_notice_says_which_alert_which_report_and_what_changed() -> None:
    moment = datetime(2026, 3, 2, 9, tzinfo=UTC)
    cited = CitedAlert(
        "new:abc", "new_substance", "critical", "FR", "FR-75C",
        AlertSubstance(name="isotonitazene", key="K"), moment, moment, moment, ("L-1",),
    )  # fmt: skip
    (new,) = _items(seizure(event_id="S-2", corrects="S-1", quantity={"value": 25, "unit": "g"}))
    old = facts_of(_items(seizure(event_id="S-1"))[0].event)
    notice = correction_notice(cited, old, new.event, "Tramadol", moment)
    assert notice.alert_type == "correction" and notice.alert_id == notice_id("new:abc", "S-2")
    assert notice.details["corrected_alert_id"] == "new:abc" and notice.details["counts_recomputed"] is False
    assert (notice.details["old_quantity"], notice.details["new_quantity"]) == ("2.5 kg", "25 g")
    assert notice.evidence_event_ids == ["S-1", "S-2"] and notice.severity == "critical"
    assert "counts are not recomputed" in notice.summary
    assert notice_id("new:abc", "S-2") != notice_id("new:abc", "S-3")


def test_a_kept_correction_carries_what_the_report_it_corrects_added_to_the_counts() -> None:
    """The retraction the sink stores (migration 0012) is the original's contribution: its time, place,
    resolved substance and grams, whether the original is pending, earlier in the batch or a correction."""
    original, fixed, refixed = _items(
        seizure(event_id="S-1", quantity={"value": 2.5, "unit": "kg"}),
        seizure(event_id="S-2", corrects="S-1", quantity={"value": 25, "unit": "g"}, region="ML-2"),
        seizure(event_id="S-3", corrects="S-2", substance={"name": "Tapentadol"}),
    )
    forged = _items(seizure(event_id="S-9", agency="Police", corrects="S-1"))[0]
    judged = judge_corrections([original, fixed, refixed, forged], {}, _claim)
    assert judged.kept == [original, fixed, refixed] and len(judged.rejects) == 1
    assert original.retracts is None and forged.retracts is None  # corrects nothing / refused
    assert fixed.retracts == counted_of(original)
    assert (fixed.retracts.region, fixed.retracts.grams, fixed.retracts.substance_key) == (
        "ML-BKO",
        2500.0,
        original.substance.key,
    )
    assert refixed.retracts == counted_of(fixed) and refixed.retracts.grams == 25.0
    # The same from a pending original (taken since the last checkpoint, not stored yet).
    (late_fix,) = _items(seizure(event_id="S-2", corrects="S-1", quantity={"value": 25, "unit": "g"}))
    known = known_reports({}, [original], {S1})
    assert judge_corrections([late_fix], known, _claim).kept == [late_fix]
    assert late_fix.retracts == counted_of(original)


def test_a_correction_names_a_report_of_its_own_reporter_never_another_s_under_the_same_id() -> None:
    """Event ids are unique per reporter only: lab-b's ``corrects`` naming 2026-000123 means lab-b's report,
    not lab-a's; with only lab-a's stored it is refused, and lab-a's report stays uncorrected."""
    theirs = ReportFacts("2026-000123", "lab_detection", "lab:LAB-A", "isotonitazene")
    known = {("lab:LAB-A", "2026-000123"): theirs}
    (squat,) = _items(lab(event_id="2026-000124", lab_id="LAB-B", corrects="2026-000123"))
    judged = judge_corrections([squat], known, _claim)
    assert judged.kept == [] and "not stored (yet) as a report of this lab" in judged.rejects[0].reason
    assert known[("lab:LAB-A", "2026-000123")].corrected_by is None
    # lab-b's own report under that id, earlier in the batch: its correction corrects that one
    own, fix = _items(
        lab(event_id="2026-000123", lab_id="LAB-B", region="FR-IDF"),
        lab(event_id="2026-000124", lab_id="LAB-B", corrects="2026-000123"),
    )
    judged = judge_corrections([own, fix], known, _claim)
    assert judged.kept == [own, fix] and fix.retracts == counted_of(own) and fix.retracts.region == "FR-IDF"
    assert known[("lab:LAB-A", "2026-000123")].corrected_by is None
    assert known[("lab:LAB-B", "2026-000123")].corrected_by == "2026-000124"


def test_an_alert_rests_on_a_corrected_report_only_if_it_may_be_the_one_its_evidence_names() -> None:
    """Evidence holds event ids alone. Nobody else holds the id: the alert rests on the report. Another
    reporter holds it too: only if the report fits the alert (substance or family series, region, window)."""
    day = datetime(2026, 3, 2, tzinfo=UTC)
    counted = Counted(day + timedelta(hours=9), "FR", "FR-75C", "KEY-ISO", "Isotonitazene", "nitazene")
    old = ReportFacts("2026-000123", "lab_detection", "lab:LAB-A", "isotonitazene", counted=counted)
    substance = AlertSubstance(name="Isotonitazene", key="KEY-ISO", family="nitazene")
    cited = CitedAlert(
        "a", "spike", "warning", "FR", "FR-75C", substance, day, day + timedelta(days=1), day, ("x", old.event_id)
    )
    assert rests_on(cited, old, {"lab:LAB-A"}) and rests_on(cited, old, set())
    both = {"lab:LAB-A", "lab:LAB-B"}
    assert rests_on(cited, old, both)
    family = replace(cited, substance=AlertSubstance(name="nitazenes", key="family:nitazene"), region=None)
    assert rests_on(family, old, both)  # a family series, network-wide
    assert not rests_on(replace(cited, region="FR-IDF"), old, both)
    assert not rests_on(replace(cited, substance=substance.model_copy(update={"key": "KEY-OTHER"})), old, both)
    assert not rests_on(
        replace(cited, window_start=day + timedelta(days=1), window_end=day + timedelta(days=2)), old, both
    )
    assert not rests_on(cited, replace(old, counted=None), both)  # nothing to tell it by: no notice
    assert not rests_on(replace(cited, evidence_event_ids=("x",)), old, {"lab:LAB-A"})  # not cited at all
