"""Intake: raw Kafka messages in, validated and enriched events (or rejects with reasons) out.

Pure and synchronous so the Faust agent, the offline backtest and the tests share it: the agent only
moves bytes in and results out. Every message ends as exactly one of: an event, a duplicate (same
reporter, ``event_id`` and content earlier in the batch), or a reject (also: the same reporter and
``event_id`` with other content, a changed report, which must come with a new id). Event ids are unique
per reporter only (:func:`~.corrections.report_key`): another reporter's report with the same id is its own.

With an :class:`~synthwatch.schemas.envelope.EnvelopeVerifier`, every record's signed envelope is checked
before it is parsed: a missing, unknown or wrong signature, or an organisation reporting as a lab or
agency that is not its own, is a reject of stage ``auth`` with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from synthwatch.schemas import BorderSeizure, LabDetection, Reject, WireError
from synthwatch.schemas.envelope import EnvelopeVerifier, Headers
from synthwatch.schemas.records import RejectStage
from synthwatch.schemas.wire import (
    DEFAULT_LIMITS,
    RecordLimits,
    changed_content_reason,
    check_event_time,
    content_digest,
    event_to_json,
    parse_limited,
)
from synthwatch.stream_apps.detect.corrections import Counted, ReportKey, report_key
from synthwatch.stream_apps.detect.identity import (
    NormalisedQuantity,
    ResolvedSubstance,
    SubstanceResolver,
    normalise_quantity,
)


@dataclass(slots=True, frozen=True)
class RawMessage:
    """One input record and where it came from (``topic:partition:offset`` or ``file:line``).

    ``topic``, ``key`` and ``headers`` are what the signed envelope covers (Kafka records only).
    ``received_at``: when the record was received (its Kafka timestamp), recorded with it, so a replay judges
    it the same; an event time more than the limits allow after it is refused (``check_event_time``).
    """

    source: str
    value: bytes | str | None
    topic: str | None = None
    key: bytes | None = None
    headers: Headers | None = None
    received_at: datetime | None = None


def changed_content_reject(event: LabDetection | BorderSeizure, source: str, stage: RejectStage) -> Reject:
    """The reject of an event whose id is already stored (or taken) with different content."""
    return Reject.of(
        event_to_json(event),
        source=source,
        reason=changed_content_reason(event.event_id),
        stage=stage,
        event_id=event.event_id,
    )


@dataclass(slots=True)
class EnrichedEvent:
    """A valid event with its resolved substance and normalised quantity."""

    event: LabDetection | BorderSeizure
    substance: ResolvedSubstance
    quantity: NormalisedQuantity | None
    source: str
    org: str | None = None  # the organisation whose signature the record carried
    late: bool = False  # set by the worker for a late report: stored with its ``late`` column true
    digest: str = ""  # content_digest of the event: a re-send with another digest is a changed report
    retracts: Counted | None = None  # a correction: what the report it corrects added to the counts
    # (claimed reporter, event_id): what tells a re-send or a changed report from another's report. Kept, not
    # derived at each look: the sink, the late check and the judge look several times per event.
    key: ReportKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = report_key(self.event)

    def changed_content_reject(self, stage: RejectStage = "worker") -> Reject:
        """The reject of this event when its id is already stored (or taken) with different content."""
        return changed_content_reject(self.event, self.source, stage)

    @property
    def event_id(self) -> str:
        return self.event.event_id


@dataclass(slots=True)
class IntakeResult:
    events: list[EnrichedEvent] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    duplicates: int = 0
    seen: dict[ReportKey, str] = field(default_factory=dict, repr=False)  # (reporter, event id) -> content digest


class Intake:
    """Validates and enriches batches; holds the substance resolver (its learnt names are state)."""

    def __init__(
        self,
        resolver: SubstanceResolver | None = None,
        stage: RejectStage = "worker",
        limits: RecordLimits = DEFAULT_LIMITS,
        verifier: EnvelopeVerifier | None = None,
    ) -> None:
        self.resolver = resolver or SubstanceResolver()
        self.stage: RejectStage = stage
        self.limits = limits  # other producers bypass the publisher's caps: the worker applies them again
        self.verifier = verifier

    def reporter(self, event: LabDetection | BorderSeizure, org: str | None = None) -> str:
        """Who vouches for a report, as identity evidence: the verified organisation, else (unsigned
        input, or a rebuild from stored rows) the organisation of its lab id, else the claimed lab/agency."""
        if org is not None:
            return f"org:{org}"
        claimed = f"lab:{event.lab_id}" if isinstance(event, LabDetection) else f"agency:{event.agency}"
        return claimed if self.verifier is None else self.stored_reporter(claimed)  # once per report: no call

    def stored_reporter(self, claimed: str) -> str:
        """:meth:`reporter` for a claimed ``lab:ID``/``agency:NAME`` (a stored report keeps no signature):
        the organisation the keys file gives it, else the claim itself."""
        org = self.verifier.org_of(claimed) if self.verifier is not None else None
        return f"org:{org}" if org is not None else claimed

    def identify(self, event: LabDetection | BorderSeizure, org: str | None = None) -> ResolvedSubstance:
        """The substance of a report (structure first, then names): what :meth:`enrich` resolves, alone."""
        reported = event.substance
        return self.resolver.resolve(
            reported.name,
            smiles=reported.smiles,
            inchikey=reported.inchikey,
            reporter=self.reporter(event, org),
            region=event.region,
            occurred_at=event.occurred_at,
            event_id=event.event_id,
        )

    def enrich(self, event: LabDetection | BorderSeizure, source: str, org: str | None = None) -> EnrichedEvent:
        """Resolve the substance (structure first, then names) and normalise the quantity."""
        substance = self.identify(event, org)
        quantity = (
            normalise_quantity(event.quantity.value, event.quantity.unit) if isinstance(event, BorderSeizure) else None
        )
        return EnrichedEvent(event=event, substance=substance, quantity=quantity, source=source, org=org)

    def _refuse(self, message: RawMessage, reason: str, event_id: str | None = None) -> Reject:
        return Reject.of(message.value or b"", source=message.source, reason=reason, stage="auth", event_id=event_id)

    def process(self, messages: Iterable[RawMessage], into: IntakeResult | None = None) -> IntakeResult:
        """Validate and enrich ``messages``; with ``into``, go on with that batch's result (a batch taken in
        slices, :mod:`synthwatch.stream_apps.runtime.agents.intake`): the same as one call over all its messages."""
        result = IntakeResult() if into is None else into
        seen = result.seen  # (reporter, event id) -> content digest, over the whole batch
        verifier = self.verifier
        for message in messages:
            if message.value is None:
                result.rejects.append(
                    Reject.of(b"", source=message.source, reason="empty message (no value)", stage=self.stage)
                )
                continue
            org: str | None = None
            if verifier is not None:
                value = message.value if isinstance(message.value, bytes) else message.value.encode()
                org, refused = verifier.check(message.topic or "", message.key, value, message.headers)
                if refused is not None:
                    result.rejects.append(self._refuse(message, refused))
                    continue
            try:
                event = parse_limited(message.value, self.limits)
                check_event_time(event, message.received_at, self.limits)  # before any watermark sees it
            except WireError as error:
                result.rejects.append(
                    Reject.of(
                        message.value,
                        source=message.source,
                        reason=error.reason,
                        stage=self.stage,
                        event_id=error.event_id,
                    )
                )
                continue
            if org is not None and verifier is not None:
                refused = verifier.permits(
                    org,
                    event.lab_id if isinstance(event, LabDetection) else None,
                    event.agency if isinstance(event, BorderSeizure) else None,
                    event.country,
                )
                if refused is not None:
                    result.rejects.append(self._refuse(message, refused, event.event_id))
                    continue
            digest = content_digest(event)
            key = report_key(event)
            earlier = seen.get(key)
            if earlier is not None:
                if earlier == digest:
                    result.duplicates += 1
                else:  # the same id with other content in one batch: a changed report, refused
                    result.rejects.append(changed_content_reject(event, message.source, self.stage))
                continue
            seen[key] = digest
            enriched = self.enrich(event, message.source, org)
            enriched.digest = digest
            result.events.append(enriched)
        return result
