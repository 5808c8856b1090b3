"""Turning detector findings into alerts: deterministic ids, severity, and a sentence people can act on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from synthwatch.catalogue import OPIOID_FAMILIES
from synthwatch.schemas import Alert, AlertSubstance
from synthwatch.schemas.events import subdivision_entry
from synthwatch.schemas.records import AlertType, GuessedFamily, Severity, SimilarSubstance

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FAMILY_LABELS = {
    "nitazene": "nitazene (benzimidazole opioid)",
    "fentanyl": "fentanyl analogue",
    "other_opioid": "opioid",
    "synthetic_cathinone": "synthetic cathinone",
    "synthetic_cannabinoid": "synthetic cannabinoid",
    "benzodiazepine": "benzodiazepine",
    "arylcyclohexylamine": "arylcyclohexylamine (dissociative)",
    "tryptamine": "tryptamine (psychedelic)",
    "phenethylamine": "phenethylamine",
    "other": "other",
}


def day_of(moment: datetime) -> int:
    """UTC day number of an aware datetime (days since 1970-01-01)."""
    return (moment - EPOCH).days


def day_start(day: int) -> datetime:
    return EPOCH + timedelta(days=day)


def alert_id(alert_type: str, region: str | None, subject: str, episode: str | int, metric: str = "") -> str:
    """Same type, place, substance and episode -> same id, on any worker, in any replay."""
    text = "\x1f".join([alert_type, region or "*", subject, metric, str(episode)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def severity(alert_type: AlertType, subject: Subject) -> Severity:
    """Critical for opioids (a never-seen opioid kills); warning for NPS news; info for the familiar.

    A name nobody could resolve (no structure, not in the catalogue) is info: it may be a spelling
    the catalogue lacks, and a false critical costs the officers' trust. An ``identified`` follow-up is info:
    its substance was known, and alerted at its own severity, before.
    """
    if subject.key.startswith("name:") and alert_type in ("new_substance", "first_in_region"):
        return "info"
    if alert_type == "identified":  # a follow-up about a substance known already (its alert was raised then)
        return "info"
    opioid = subject.family in OPIOID_FAMILIES
    if opioid:
        return "critical"
    if alert_type == "first_in_region" and subject.catalogued and subject.controlled:
        return "info" if subject.family in (None, "other") else "warning"
    return "warning"


def region_label(region: str | None) -> str:
    if region is None:
        return "the network"
    subdivision = subdivision_entry(region)  # pycountry's lookup without loading its database (start-up)
    return f"{region} ({subdivision[1]})" if subdivision is not None else region


@dataclass(slots=True)
class Subject:
    """What an alert is about: a substance, or a family series (``family:<name>``)."""

    key: str
    name: str
    inchikey: str | None
    family: str | None
    controlled: bool | None
    catalogued: bool
    identified_by: str | None = None  # how the resolver established identity (ResolvedSubstance.resolved_by)
    formerly: str | None = None  # the name key this report's name had until it tied it to a structure
    formerly_regions: tuple[str, ...] = ()  # the regions that name was reported from, by name only
    formerly_since: str | None = None  # the day (ISO date) that name was first reported by name only

    def as_alert_substance(self) -> AlertSubstance:
        return AlertSubstance(
            name=self.name, key=self.key, inchikey=self.inchikey, family=self.family, controlled=self.controlled
        )

    @property
    def family_text(self) -> str:
        return FAMILY_LABELS.get(self.family or "", "unclassified structure") if self.family else "unclassified"


def build_alert(
    *,
    alert_type: AlertType,
    subject: Subject,
    country: str | None,
    region: str | None,
    triggered_at: datetime,
    window_start: datetime,
    window_end: datetime,
    episode: str | int,
    evidence: list[str],
    summary: str,
    metric: str | None = None,
    observed: float | None = None,
    expected: float | None = None,
    score: float | None = None,
    methods: list[str] | None = None,
    sample_types: list[str] | None = None,
    details: dict[str, object] | None = None,
    late_by_hours: float | None = None,
    reported_by: list[str] | None = None,
    similar_substances: list[SimilarSubstance] | None = None,
    family_guess: GuessedFamily | None = None,
    did_you_mean: list[str] | None = None,
) -> Alert:
    """An alert from a finding; ``late_by_hours`` (set when a late report raised it) is stated in the summary.

    The identity method comes from ``subject`` (a family series has none); ``reported_by`` names the labs or
    agencies whose reports the alert rests on, so an officer can ask them. A new substance also carries its
    nearest known relatives, a family guess when no pattern classified it, or "did you mean" names.
    """
    if late_by_hours is not None:
        summary = f"{summary} {late_note(late_by_hours)}"
    return Alert(
        alert_id=alert_id(alert_type, region, subject.key, episode, metric or ""),
        alert_type=alert_type,
        severity=severity(alert_type, subject),
        country=country,
        region=region,
        substance=subject.as_alert_substance(),
        metric=metric,  # type: ignore[arg-type]
        observed=observed,
        expected=expected,
        score=score,
        window_start=window_start,
        window_end=window_end,
        triggered_at=triggered_at,
        evidence_event_ids=evidence,
        summary=summary,
        identification_methods=methods or [],
        sample_types=sample_types or [],
        details=details or {},
        reported_late=late_by_hours is not None,
        late_by_hours=late_by_hours,
        identified_by=subject.identified_by,  # type: ignore[arg-type]
        reported_by=sorted(set(reported_by or [])),
        similar_substances=similar_substances or [],
        family_guess=family_guess,
        did_you_mean=did_you_mean or [],
    )


#: How identity was established, in the English summary (messages.py has every language).
IDENTIFIED_TEXT = {
    "structure": "identified by the structure the lab reported",
    "catalogue_name": "identified by its catalogue name (no structure reported)",
    "learnt_name": "identified by a synonym learnt from earlier reports with a structure (no structure reported)",
    "unresolved_name": "reported by name only, not identified",
}


def late_note(late_by_hours: float) -> str:
    """The sentence an alert raised by a late report carries (how late, against what)."""
    return (
        f"Reported late: the report occurred {late_by_hours:,.1f} h ({late_by_hours / 24:.1f} days) before the "
        "newest report of its kind already received from its region."
    )
