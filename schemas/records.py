"""Records the pipeline itself produces: rejects (bad input kept with its reason) and alerts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RejectStage = Literal["publish", "worker", "auth", "detection", "backtest", "ingest"]
#: ``correction``: not a detection but a notice that a report an earlier alert rests on was corrected; it goes
#: to whoever received that alert (stream_apps/detect/corrections.py).
AlertType = Literal["new_substance", "first_in_region", "spike", "spread", "correction", "identified"]
Severity = Literal["info", "warning", "critical"]
#: How a report's substance was identified: the structure the lab reported (SMILES or InChIKey), a catalogue
#: name or synonym, a name learnt from earlier reports that carried a structure, or nothing (a bare name).
IdentifiedBy = Literal["structure", "catalogue_name", "learnt_name", "unresolved_name"]

#: Longest raw input kept in a reject; the rest is cut so one huge line cannot clog the topic.
MAX_RAW_CHARS = 100_000
MAX_REASON_CHARS = 2_000


def utc_now() -> datetime:
    return datetime.now(UTC)


class Reject(BaseModel):
    """An input that could not be used, kept verbatim with a reason a person can act on."""

    model_config = ConfigDict(extra="forbid")

    raw: str = Field(description="The input as received (decoded with replacement, cut at 100,000 chars).")
    source: str = Field(description="Where it came from: a topic, or a file and line number.")
    reason: str = Field(description="Why it was refused, in words.")
    stage: RejectStage
    event_id: str | None = Field(default=None, description="The event id, when one could be read.")
    rejected_at: datetime = Field(default_factory=utc_now)

    @classmethod
    def of(
        cls, raw: bytes | str, *, source: str, reason: str, stage: RejectStage, event_id: str | None = None
    ) -> Reject:
        if isinstance(raw, str):  # readers keep undecodable bytes as surrogates: make them visible
            raw = raw.encode("utf-8", errors="surrogateescape")
        text = raw.decode("utf-8", errors="replace")
        if len(text) > MAX_RAW_CHARS:
            text = text[:MAX_RAW_CHARS] + f"... [{len(text) - MAX_RAW_CHARS} more characters cut]"
        if len(reason) > MAX_REASON_CHARS:  # reasons quote inputs: keep the record well under Kafka's 1 MB
            reason = reason[:MAX_REASON_CHARS] + "... [reason cut]"
        source = source[:1000]
        event_id = event_id[:500] if event_id else event_id
        return cls(raw=text, source=source, reason=reason, stage=stage, event_id=event_id)


class AlertSubstance(BaseModel):
    """The substance an alert is about, as the identity resolver named it."""

    name: str
    key: str = Field(description="Stable substance key: InChIKey first block, or `name:<normalised>`.")
    inchikey: str | None = None
    family: str | None = None
    controlled: bool | None = Field(default=None, description="Under international control, when known.")


class SimilarSubstance(BaseModel):
    """A known substance structurally close to the one a new-substance alert is about (what a chemist asks first)."""

    name: str
    key: str
    score: float = Field(ge=0, le=1, description="Tanimoto similarity of Morgan fingerprints (radius 2, 2,048 bits).")
    family: str | None = None
    controlled: bool | None = Field(default=None, description="Under international control, when known.")
    catalogued: bool = Field(description="In the catalogue; False: a structure the network learnt from reports.")


class LearntNeighbours(BaseModel):
    """Structures the network learnt from reports (not in the catalogue) near a new substance, as of a stored cut.

    Why a cut: which reports a worker has met when it raises an alert depends on timing (partitions, lag, a
    replay), so the section is defined by the store instead: the structures whose first report was stored in
    ClickHouse at or before ``as_of``. ``as_of`` is fixed by the sightings message that raised the alert, so a
    replay after a crash asks the same question and gets the same answer. A learnt structure has no legal
    status; its family comes from a structural (SMARTS) pattern, or is unknown.
    """

    as_of: datetime = Field(description="Stored-before cut: only reports stored in ClickHouse by then count.")
    substances: list[SimilarSubstance] = Field(
        default_factory=list, description="The nearest learnt structures, best first (each ``catalogued`` False)."
    )


class GuessedFamily(BaseModel):
    """A family inferred from the nearest known substance, for a structure no SMARTS pattern matched: a guess."""

    family: str
    score: float = Field(ge=0, le=1, description="Similarity to ``nearest``, the substance the guess rests on.")
    nearest: str


class Alert(BaseModel):
    """An early warning. Carries what applies of a European drug alert (risk, place, method, data)."""

    model_config = ConfigDict(extra="forbid")

    alert_id: str = Field(description="Deterministic: type, region, substance and episode.")
    alert_type: AlertType
    severity: Severity
    country: str | None = None
    region: str | None = Field(default=None, description="ISO 3166-2; None for network-wide alerts.")
    substance: AlertSubstance
    metric: Literal["count", "quantity"] | None = Field(default=None, description="Spikes only.")
    observed: float | None = None
    expected: float | None = None
    score: float | None = Field(default=None, description="Strength of evidence (e.g. -log10 p-value).")
    window_start: datetime
    window_end: datetime
    triggered_at: datetime = Field(description="Event time of the report that made the alert true.")
    detected_at: datetime = Field(default_factory=utc_now, description="Wall-clock time it was raised.")
    evidence_event_ids: list[str] = Field(default_factory=list)
    summary: str = Field(default="", description="One sentence a liaison officer can read.")
    identification_methods: list[str] = Field(default_factory=list)
    sample_types: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)
    reported_late: bool = Field(
        default=False,
        description="Raised by a report that arrived late: it occurred more than the lateness before the newest "
        "report of its kind already received from its region.",
    )
    late_by_hours: float | None = Field(
        default=None, ge=0, description="How late that report was, in hours (None when it was on time)."
    )
    identified_by: IdentifiedBy | None = Field(
        default=None,
        description="How the substance of the report that raised the alert was identified: structure reported by "
        "the lab, catalogue name, learnt synonym, or unresolved name. None for family series.",
    )
    reported_by: list[str] = Field(
        default_factory=list,
        description="Labs (lab_id) and agencies whose report raised the alert: whom an officer can ask. For a "
        "spike, the report that tipped it; the window's other reports are in evidence_event_ids.",
    )
    similar_substances: list[SimilarSubstance] = Field(
        default_factory=list,
        description="New substances only: the nearest known substances by structural similarity, best first.",
    )
    family_guess: GuessedFamily | None = Field(
        default=None,
        description="New substances only: a family guessed from the nearest neighbour when no SMARTS pattern "
        "matched the structure (never a classification).",
    )
    did_you_mean: list[str] = Field(
        default_factory=list,
        description="New substances reported by a name nothing resolved: catalogue names spelt most like it.",
    )
    learnt_substances: LearntNeighbours | None = Field(
        default=None,
        description="New substances only: the nearest structures learnt from reports stored before a cut (see "
        "LearntNeighbours). None when not looked up (the backtest has no store; a name-only report).",
    )
