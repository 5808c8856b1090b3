"""Intake: raw Kafka messages in, validated and enriched events (or rejects with reasons) out.

Pure and synchronous so the Faust agent, the offline backtest and the tests share it: the agent only
moves bytes in and results out. Every message ends as exactly one of: an event, a duplicate (same
``event_id`` earlier in the batch), or a reject.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from synthwatch.schemas import BorderSeizure, LabDetection, Reject, WireError
from synthwatch.schemas.records import RejectStage
from synthwatch.schemas.wire import DEFAULT_LIMITS, RecordLimits, parse_limited

from .identity import NormalisedQuantity, ResolvedSubstance, SubstanceResolver, normalise_quantity


@dataclass(slots=True, frozen=True)
class RawMessage:
    """One input record and where it came from (``topic:partition:offset`` or ``file:line``)."""

    source: str
    value: bytes | str | None


@dataclass(slots=True)
class EnrichedEvent:
    """A valid event with its resolved substance and normalised quantity."""

    event: LabDetection | BorderSeizure
    substance: ResolvedSubstance
    quantity: NormalisedQuantity | None
    source: str
    late: bool = False  # set by the worker for a late report: stored with its ``late`` column true

    @property
    def event_id(self) -> str:
        return self.event.event_id


@dataclass(slots=True)
class IntakeResult:
    events: list[EnrichedEvent] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    duplicates: int = 0


class Intake:
    """Validates and enriches batches; holds the substance resolver (its learnt names are state)."""

    def __init__(
        self,
        resolver: SubstanceResolver | None = None,
        stage: RejectStage = "worker",
        limits: RecordLimits = DEFAULT_LIMITS,
    ) -> None:
        self.resolver = resolver or SubstanceResolver()
        self.stage: RejectStage = stage
        self.limits = limits  # other producers bypass the publisher's caps: the worker applies them again

    def enrich(self, event: LabDetection | BorderSeizure, source: str) -> EnrichedEvent:
        """Resolve the substance (structure first, then names) and normalise the quantity."""
        reported = event.substance
        substance = self.resolver.resolve(reported.name, smiles=reported.smiles, inchikey=reported.inchikey)
        quantity = (
            normalise_quantity(event.quantity.value, event.quantity.unit) if isinstance(event, BorderSeizure) else None
        )
        return EnrichedEvent(event=event, substance=substance, quantity=quantity, source=source)

    def process(self, messages: Iterable[RawMessage]) -> IntakeResult:
        result = IntakeResult()
        seen: set[str] = set()
        for message in messages:
            if message.value is None:
                result.rejects.append(
                    Reject.of(b"", source=message.source, reason="empty message (no value)", stage=self.stage)
                )
                continue
            try:
                event = parse_limited(message.value, self.limits)
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
            if event.event_id in seen:
                result.duplicates += 1
                continue
            seen.add(event.event_id)
            result.events.append(self.enrich(event, message.source))
        return result
