"""Corrections: who may correct a stored report, and what an officer is told when one is corrected.

A lab that finds it misidentified a substance (isotonitazene, confirmatory analysis says protonitazene) or
mistyped a quantity sends the right report under a new ``event_id`` with ``corrects`` naming the old one.
Both stay stored (a report is never overwritten); the old one is marked corrected. Because ``corrects``
comes from outside, it is judged like any hostile input (:func:`judge_corrections`):

- only the reporter of the original may correct it: the same kind, the same ``lab_id`` (lab detections)
  or ``agency`` (border seizures) and, for signed records, the same organisation. Event ids are unique per
  reporter only, so ``corrects`` names a report of the correction's own reporter: it is looked up by
  (reporter, id) (:func:`report_key`), and another reporter's report under that id is never its target;
- the original must be known: stored, or taken earlier (this batch, or since the last checkpoint);
  a correction that arrives before its original is refused with a reason (send the original first);
- one correction per report: a report already corrected is corrected again by correcting its
  correction (a chain), never by a second correction of the same report.

A refused correction is a reject of stage ``worker`` whose reason starts ``corrects:``; it costs no valid
record and is counted like every reject. Pure: the caller looks the originals up (in one query per batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from synthwatch.schemas import Alert, BorderSeizure, LabDetection, Reject
from synthwatch.schemas.events import EventKind
from synthwatch.schemas.records import AlertSubstance, RejectStage
from synthwatch.schemas.wire import event_to_json


@dataclass(frozen=True, slots=True)
class Counted:
    """What one report added to the counts when it was stored: the keys and amount of its aggregate rows.

    A correction carries these facts of the report it corrects (looked up with it when the correction is
    judged), so taking that report out of the counts is a function of the correction alone: the sink stores
    them as the correction's row of ``retractions`` (once per correction id) and the retraction views
    (migration 0012) subtract them. The original's row is immutable, so a replay looks up the same facts."""

    occurred_at: datetime
    country: str
    region: str
    substance_key: str
    substance_name: str  # the resolved display name (the aggregates' ``substance_name``)
    family: str  # "" when none
    grams: float | None = None  # seizures: the normalised mass, None for volumes, units and lab detections


@dataclass(frozen=True, slots=True)
class ReportFacts:
    """What a correction is judged against and what a notice quotes: one stored (or pending) report."""

    event_id: str
    kind: EventKind
    reporter: str  # the claimed reporter: ``lab:ID`` or ``agency:NAME``
    substance: str  # the substance as the report named it (the resolved name when it gave only a structure)
    quantity: str = ""  # "2.5 kg" for seizures, "" for lab detections
    corrected_by: str | None = None  # the event id of the stored correction of this report, if any
    counted: Counted | None = None  # what it added to the counts (taken out when a correction of it is stored)


def claimed_reporter(event: LabDetection | BorderSeizure) -> str:
    """``lab:ID`` or ``agency:NAME``: who a report says it comes from (what a correction must repeat)."""
    return f"lab:{event.lab_id}" if isinstance(event, LabDetection) else f"agency:{event.agency}"


ReportKey = tuple[str, str]
"""(claimed reporter, event_id): what identifies a report. Event ids are unique per reporter only (a lab's
LIMS numbers its own samples), so two reporters may send the same id; each is its own report."""


def report_key(event: LabDetection | BorderSeizure) -> ReportKey:
    """The :data:`ReportKey` of a report: duplicates, changed content and corrections are judged by it."""
    return claimed_reporter(event), event.event_id


def facts_of(
    event: LabDetection | BorderSeizure, resolved_name: str = "", counted: Counted | None = None
) -> ReportFacts:
    """The :class:`ReportFacts` of an event not stored yet (earlier in the batch or since the checkpoint)."""
    quantity = f"{event.quantity.value:g} {event.quantity.unit}" if isinstance(event, BorderSeizure) else ""
    return ReportFacts(
        event.event_id,
        event.kind,
        claimed_reporter(event),
        event.substance.name or resolved_name or event.substance.inchikey or "",
        quantity,
        counted=counted,
    )


def counted_of(item: Any) -> Counted:
    """The :class:`Counted` facts of an :class:`~.intake.EnrichedEvent`: what storing it adds to the counts
    (the same values the sink stores in its row: resolved substance key and name, family, grams)."""
    event: LabDetection | BorderSeizure = item.event
    quantity = item.quantity
    return Counted(
        event.occurred_at,
        event.country,
        event.region,
        item.substance.key,
        item.substance.display_name,
        item.substance.family or "",
        quantity.grams if quantity is not None and isinstance(event, BorderSeizure) else None,
    )


def _shown(event_id: str) -> str:
    return repr(event_id if len(event_id) <= 80 else event_id[:80] + "...")


def correction_refusal(
    event: LabDetection | BorderSeizure,
    original: ReportFacts | None,
    organisation_of: Callable[[str], str],
    org: str | None,
) -> str | None:
    """Why ``event`` may not correct ``original`` (``None``: it may). ``organisation_of`` maps a claimed
    reporter to ``org:NAME`` when a keys file names its organisation (else returns the claim)."""
    target = event.corrects
    assert target is not None
    if original is None:
        who = "lab (lab_id)" if isinstance(event, LabDetection) else "agency"
        return (
            f"corrects: event_id {_shown(target)} is not stored (yet) as a report of this {who}: a correction "
            "names a report of its own reporter (event ids are unique per reporter), and is taken once that "
            "report is; send that report first, or, if it was rejected, send the right report as a new one "
            "without `corrects`"
        )
    if original.kind != event.kind:
        return (
            f"corrects: event_id {_shown(target)} is a {original.kind}, this report a {event.kind}: a correction "
            "is of the same kind as the report it corrects"
        )
    mine = claimed_reporter(event)
    if original.reporter != mine or (org is not None and organisation_of(original.reporter) != f"org:{org}"):
        who = "lab (lab_id)" if isinstance(event, LabDetection) else "agency"
        return (
            f"corrects: event_id {_shown(target)} was reported by another {who}: only the reporter of a report "
            "may correct it"
        )
    if original.corrected_by is not None and original.corrected_by != event.event_id:
        return (
            f"corrects: event_id {_shown(target)} is already corrected by {_shown(original.corrected_by)}: "
            "correct that report instead (corrections form a chain, one per report)"
        )
    return None


def corrected_key(event: LabDetection | BorderSeizure) -> ReportKey | None:
    """The :data:`ReportKey` of the report ``event`` corrects (its own reporter's), None if it corrects none."""
    return None if event.corrects is None else (claimed_reporter(event), event.corrects)


def known_reports(
    stored: Mapping[ReportKey, ReportFacts], pending: Iterable[Any], named: Collection[ReportKey]
) -> dict[ReportKey, ReportFacts]:
    """What the corrections of a batch can be judged against: the stored reports they name, and the
    ``pending`` items (:class:`~.intake.EnrichedEvent`, taken since the last checkpoint, not stored yet),
    which count as known and whose corrections mark what they correct (a stored report too). Keyed by
    (reporter, event id): a report of another reporter under a named id is not the one named."""
    known = dict(stored)
    corrected: dict[ReportKey, str] = {}
    for item in pending:
        event: LabDetection | BorderSeizure = item.event
        key: ReportKey = item.key
        if key in named:
            known.setdefault(key, facts_of(event, item.substance.display_name, counted_of(item)))
        target = corrected_key(event)
        if target is not None and target in named:
            corrected.setdefault(target, event.event_id)  # the first one: later forks were refused
    for old, new in corrected.items():
        if old in known and known[old].corrected_by is None:
            known[old] = replace(known[old], corrected_by=new)
    return known


@dataclass(slots=True)
class Judged:
    """The events of a batch with the refused corrections taken out (in order), and their rejects."""

    kept: list[Any]
    rejects: list[Reject]


def judge_corrections(
    items: Iterable[Any],
    known: MutableMapping[ReportKey, ReportFacts],
    organisation_of: Callable[[str], str],
    stage: RejectStage = "worker",
) -> Judged:
    """Keep the items (:class:`~.intake.EnrichedEvent`) that are not corrections or may correct what they
    name; refuse the others. ``known`` holds the reports the corrections name (stored or pending), by
    (reporter, event id), and is
    updated as the batch goes, so a correction earlier in the batch is known to the ones after it (a chain).

    A kept correction's ``retracts`` is set to what the original added to the counts (:class:`Counted`):
    storing the correction takes that out of the aggregates."""
    judged = Judged([], [])
    for item in items:
        event: LabDetection | BorderSeizure = item.event
        target = corrected_key(event)
        if target is not None:
            original = known.get(target)
            refused = correction_refusal(event, original, organisation_of, item.org)
            if refused is not None:
                judged.rejects.append(
                    Reject.of(
                        event_to_json(event), source=item.source, reason=refused, stage=stage, event_id=event.event_id
                    )
                )
                continue
            assert original is not None
            known[target] = replace(original, corrected_by=event.event_id)
            item.retracts = original.counted  # set here, as the worker sets ``late``: the item is this batch's
        key = item.key
        if key not in known:
            known[key] = facts_of(event, item.substance.display_name, counted_of(item))
        judged.kept.append(item)
    return judged


# --- what officers are told ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CitedAlert:
    """An alert as stored, with what a correction notice needs of it."""

    alert_id: str
    alert_type: str
    severity: str
    country: str | None
    region: str | None
    substance: AlertSubstance
    window_start: datetime
    window_end: datetime
    triggered_at: datetime
    evidence_event_ids: tuple[str, ...]
    #: When it was first detected (stored rows of one alert id may differ: the earliest); None if not known. A
    #: correction notice carries it so the delivery side can bound its reads about the alert (weeks may lie between).
    detected_at: datetime | None = None


def rests_on(cited: CitedAlert, old: ReportFacts, holders: Collection[str]) -> bool:
    """Whether ``cited`` may rest on ``old`` (a corrected report), so a notice of its correction is owed.

    An alert's evidence holds event ids alone, and event ids are unique per reporter only: when another
    reporter (``holders``: the claimed reporters with a stored report under ``old``'s id) holds a report under
    the same id, the evidence may name that one. Then ``old`` must fit the alert: its substance (or, for a
    family series, its family), its region (unless the alert is network-wide) and its occurrence within the
    alert's window. Otherwise a lab that sent a report under another lab's id and corrected it would send a
    notice on the other lab's alert ('report X behind alert ... was corrected') that is not true."""
    if old.event_id not in cited.evidence_event_ids:
        return False
    if not set(holders) - {old.reporter}:
        return True  # nobody else holds the id: the evidence names this report
    counted = old.counted
    if counted is None:
        return False
    substance = cited.substance.key in (counted.substance_key, f"family:{counted.family}")
    region = cited.region is None or cited.region == counted.region
    return substance and region and cited.window_start <= counted.occurred_at < cited.window_end


def notice_id(alert_id: str, correction_event_id: str) -> str:
    """Deterministic id of the notice that ``correction_event_id`` changed the basis of ``alert_id``."""
    digest = hashlib.sha256(f"{alert_id}\x1f{correction_event_id}".encode()).hexdigest()[:16]
    return f"correction:{digest}"


def correction_notice(
    cited: CitedAlert, old: ReportFacts, new: LabDetection | BorderSeizure, new_substance: str, detected_at: datetime
) -> Alert:
    """The notice that ``new`` corrected ``old``, a report ``cited`` rests on: an alert of type
    ``correction`` that goes to those who received ``cited`` (never re-routed), and says that the counts
    behind ``cited`` are not recomputed."""
    new_quantity = f"{new.quantity.value:g} {new.quantity.unit}" if isinstance(new, BorderSeizure) else ""
    details = {
        "corrected_alert_id": cited.alert_id,
        "corrected_alert_type": cited.alert_type,
        "corrected_event_id": old.event_id,
        "correction_event_id": new.event_id,
        "old_substance": old.substance,
        "new_substance": new_substance,
        "old_quantity": old.quantity,
        "new_quantity": new_quantity,
        "counts_recomputed": False,
    }
    if cited.detected_at is not None:
        details["corrected_detected_at"] = cited.detected_at.isoformat()
    summary = (
        f"Report {old.event_id} behind alert {cited.alert_id} was corrected by report {new.event_id}: "
        f"substance {old.substance} -> {new_substance}"
        + (f", quantity {old.quantity} -> {new_quantity}" if old.quantity or new_quantity else "")
        + ". The alert's basis changed; its counts are not recomputed."
    )
    return Alert(
        alert_id=notice_id(cited.alert_id, new.event_id),
        alert_type="correction",
        severity=cited.severity,  # type: ignore[arg-type]  # read back from the alerts table
        country=cited.country,
        region=cited.region,
        substance=cited.substance,
        window_start=cited.window_start,
        window_end=cited.window_end,
        triggered_at=new.occurred_at,
        detected_at=detected_at,
        evidence_event_ids=[old.event_id, new.event_id],
        summary=summary,
        details=details,
        reported_by=[claimed_reporter(new).split(":", 1)[1]],
    )
