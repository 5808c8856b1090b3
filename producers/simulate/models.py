"""The simulator's public models: its configuration, the incidents it injects, the truth that labels them,
and the generated stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

IncidentType = Literal["new_substance", "first_in_region", "spike"]
SpikeMetric = Literal["count", "quantity"]
MalformedKind = Literal[
    "truncated_json",
    "bad_region_code",
    "region_of_other_country",
    "negative_quantity",
    "unknown_kind",
    "blank_substance_name",
    "naive_timestamp",
    "missing_required_field",
]
MALFORMED_KINDS: tuple[MalformedKind, ...] = get_args(MalformedKind)  # in the order declared

#: Share of lab detections among baseline events (the rest are border seizures).
LAB_SHARE = 0.55
#: Day-of-week factors (Monday first, mean 1): labs close at weekends, borders much less so.
LAB_WEEKLY = (1.2, 1.25, 1.25, 1.2, 1.1, 0.55, 0.45)
SEIZURE_WEEKLY = (1.1, 1.1, 1.1, 1.05, 1.05, 0.85, 0.75)
_WEEKLY = (LAB_WEEKLY, SEIZURE_WEEKLY)
#: Share of weighed seizures that are bulk consignments (the far end of the heavy tail).
BULK_SHARE = 0.005
_LAB, _SEIZURE = 0, 1

_NAIVE_EPOCH = datetime(1970, 1, 1)
_EPOCH_DATE = date(1970, 1, 1)
_HOUR = 3600
_DAY = 86400


# --------------------------------------------------------------------------------------------------
# Public models
# --------------------------------------------------------------------------------------------------


class SimulationConfig(BaseModel):
    """What to simulate. The counts of injected incidents default to rates per eligible day (the days
    after ``warmup_days``), so a benchmark with a 60-day warm-up still gets a clean baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: int = Field(ge=1, le=3660)
    seed: int = Field(ge=0)
    start: date
    events_per_day: float = Field(default=300.0, gt=0, le=100_000, description="Mean over all regions.")
    malformed_fraction: float = Field(default=0.003, ge=0, le=0.5)
    duplicate_fraction: float = Field(default=0.005, ge=0, le=0.5)
    late_fraction: float = Field(default=0.02, ge=0, le=1, description="Arriving 1.5-20 h after occurring.")
    very_late_fraction: float = Field(
        default=0.001,
        ge=0,
        le=1,
        description="Arriving 25-72 h after occurring: beyond the default lateness, so stored flagged late.",
    )
    new_substances: int | None = Field(default=None, ge=0, description="Default: ~1 per 10 days, >= 1 if >= 7.")
    first_appearances: int | None = Field(default=None, ge=0, description="Default: ~1 per 5 days.")
    spikes: int | None = Field(default=None, ge=0, description="Default: ~1 per 7 days.")
    warmup_days: int = Field(default=0, ge=0, description="No injected incident starts before this day.")

    @model_validator(mode="after")
    def _fractions_fit(self) -> SimulationConfig:
        if not date(1990, 1, 1) <= self.start <= date(2099, 12, 31) - timedelta(days=self.days + 3):
            raise ValueError("the simulated period (plus late arrivals) must lie within 1990-2099, as on the wire")
        if self.late_fraction + self.very_late_fraction > 1:
            raise ValueError("late_fraction + very_late_fraction must not exceed 1")
        if self.malformed_fraction + self.duplicate_fraction >= 1:
            raise ValueError("malformed_fraction + duplicate_fraction must stay below 1")
        return self

    @property
    def eligible_days(self) -> int:
        """Days on which incidents may start."""
        return max(0, self.days - self.warmup_days)

    def incident_counts(self) -> tuple[int, int, int]:
        """(new substances, first appearances, spikes) requested, defaults resolved."""
        eligible = self.eligible_days
        new = self.new_substances
        if new is None:
            new = max(1, int(eligible / 10 + 0.5)) if eligible >= 7 else 0
        first = self.first_appearances if self.first_appearances is not None else int(eligible / 5 + 0.5)
        spikes = self.spikes if self.spikes is not None else int(eligible / 7 + 0.5)
        return new, first, spikes


class SpreadStep(BaseModel):
    """A new substance reaching one more region (the first step is its start region)."""

    region: str
    country: str
    first_seen: datetime
    event_id: str


class Incident(BaseModel):
    """One injected, labelled incident. ``start`` is the first event's time (UTC).

    For spikes, ``factor`` multiplies the baseline rate (metric ``count``) or the usual mean seizure
    mass (metric ``quantity``: a few seizures that much bigger); ``baseline_per_day`` is the expected
    events (count) or grams (quantity) per day of that region x substance without the spike, and
    ``window_start``/``window_end`` bound the local days the spike covers.
    """

    incident_id: str
    type: IncidentType
    substance_name: str
    smiles: str | None = None
    inchikey: str | None = None
    family: str
    region: str
    country: str
    start: datetime
    end: datetime | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    factor: float | None = None
    metric: SpikeMetric | None = None
    baseline_per_day: float | None = None
    event_ids: list[str]
    spread: list[SpreadStep] = Field(default_factory=list)


class MalformedLine(BaseModel):
    """A line that must be rejected; ``line`` is 1-based in the file."""

    line: int
    kind: MalformedKind
    event_id: str | None = None


class Truth(BaseModel):
    """Everything a benchmark needs to score a detector on the stream.

    ``lines == valid_unique + malformed + duplicates``; ``late`` and ``very_late`` are disjoint subsets
    of ``valid_unique`` (delayed 1.5-20 h and 25-72 h respectively; the worker stores both, and flags
    the ``very_late`` ones late when newer reports of their region and kind came first).
    """

    config: SimulationConfig
    catalogue_size: int
    lines: int
    valid_unique: int
    malformed: int
    duplicates: int
    late: int
    very_late: int
    incidents: list[Incident]
    malformed_kinds: list[MalformedLine]
    late_event_ids: list[str]
    very_late_event_ids: list[str]


_LineStatus = Literal["event", "duplicate", "malformed"]


@dataclass
class Simulation:
    """A generated stream: ``lines`` in arrival (file) order, its ``truth``, and per line whether it
    is a first-sent valid ``event``, a ``duplicate`` re-send or ``malformed``."""

    lines: list[str]
    truth: Truth
    statuses: list[_LineStatus] = field(repr=False, default_factory=list)

    def write(self, path: Path, truth_path: Path | None = None) -> None:
        """Write the NDJSON (UTF-8, ``\\n`` line ends) and, if asked, the truth as indented JSON."""
        path.write_bytes("".join(line + "\n" for line in self.lines).encode())
        if truth_path is not None:
            truth_path.write_bytes((self.truth.model_dump_json(indent=2) + "\n").encode())

    def iter_events(self) -> Iterator[dict[str, Any]]:
        """The valid, first-sent events as dicts, in file order (no malformed line, no re-send)."""
        for line, status in zip(self.lines, self.statuses, strict=True):
            if status == "event":
                yield json.loads(line)
