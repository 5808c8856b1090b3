"""A realistic, labelled, deterministic stream of lab detections and border seizures.

Why: the detectors (never-seen substance, first appearance in a region, volume spike, spread) can only
be tuned and benchmarked on a stream whose answers are known. This module writes such a stream as
NDJSON in arrival order (late, duplicated and malformed lines included, as real feeds have them) and a
``Truth`` document that labels every injected incident with the ids of its events.

Everything is a pure function of :class:`SimulationConfig` and the catalogue: one ``random.Random``
and one seeded ``numpy`` generator per purpose, no wall clock, no set iteration, so the same config
gives byte-identical lines and truth.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import unicodedata
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rdkit import Chem
from rdkit.rdBase import BlockLogs

from synthwatch.catalogue import CatalogueEntry, shipped_catalogue
from synthwatch.producers.simulate_templates import (
    BLOC_AFFINITY,
    BLOC_LINKS,
    NOVEL_CORES,
    NOVEL_FAMILY_WEIGHTS,
    ORIGINS,
    PURITY,
    QUANTITY_FORMS,
    REGIONS,
    SALT_FAMILIES,
    SALTS,
    Agency,
    Region,
    propose_novel,
)
from synthwatch.schemas.wire import WireError, parse_event

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
MALFORMED_KINDS: tuple[MalformedKind, ...] = (
    "truncated_json",
    "bad_region_code",
    "region_of_other_country",
    "negative_quantity",
    "unknown_kind",
    "blank_substance_name",
    "naive_timestamp",
    "missing_required_field",
)

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


# --------------------------------------------------------------------------------------------------
# Structures and names
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Forms:
    """RDKit work for one structure, done once: the spellings a lab may use, and its InChIKey."""

    canonical: str
    variants: tuple[str, ...]
    inchikey: str | None
    heavy_atoms: int


@lru_cache(maxsize=4096)
def _structure_forms(smiles: str) -> _Forms:
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return _Forms(smiles, (smiles,), None, 0)
        variants = tuple(Chem.MolToRandomSmilesVect(mol, 8, randomSeed=zlib.crc32(smiles.encode()) & 0x7FFFFFFF))
        inchikey = Chem.MolToInchiKey(mol) or None
        return _Forms(Chem.MolToSmiles(mol), variants, inchikey, mol.GetNumHeavyAtoms())


@lru_cache(maxsize=1024)
def _has_core(smiles: str, family: str) -> bool:
    """Whether a generated structure kept its family's scaffold (see ``NOVEL_CORES``)."""
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        core = Chem.MolFromSmarts(NOVEL_CORES[family])
        return mol is not None and core is not None and mol.HasSubstructMatch(core)


def _normalise_name(name: str) -> str:
    """Case, accents and punctuation folded (as the stream's resolver does): "3-MMC" == " 3 mmc "."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(ch for ch in decomposed if ch.isalnum() and not unicodedata.combining(ch))


@dataclass(frozen=True)
class _Substance:
    name: str
    family: str
    nps: bool
    smiles: str
    cas: str | None
    novel: bool
    lab_names: tuple[tuple[str, ...], tuple[float, ...]]
    seizure_names: tuple[tuple[str, ...], tuple[float, ...]]


def _weighted(pairs: Sequence[tuple[str, float]]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Merge duplicate values and return (values, cumulative weights) for bisect sampling."""
    merged: dict[str, float] = {}
    for value, weight in pairs:
        merged[value] = merged.get(value, 0.0) + weight
    return tuple(merged), tuple(itertools.accumulate(merged.values()))


def _spellings(name: str) -> list[tuple[str, float]]:
    """How customs officers type a name: case, spacing and hyphen variants."""
    return [
        (name, 4.0),
        (name.lower(), 2.0),
        (name.upper(), 1.0),
        (name.replace("-", " "), 1.0),
        (name.replace("-", ""), 1.0),
        (f" {name.lower()}  ", 0.3),
        (name.replace("-", "  "), 0.2),
    ]


def _catalogue_substances(catalogue: Sequence[CatalogueEntry]) -> list[_Substance]:
    owners: dict[str, set[int]] = {}
    for index, entry in enumerate(catalogue):
        for text in (entry.name, *entry.synonyms):
            owners.setdefault(_normalise_name(text), set()).add(index)

    def unambiguous(index: int, pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
        kept = [(text, w) for text, w in pairs if text.strip() and owners.get(_normalise_name(text)) == {index}]
        return kept

    substances = []
    for index, entry in enumerate(catalogue):
        synonyms = list(entry.synonyms)
        lab = [(entry.name, 0.85)] + [(s, 0.15 / len(synonyms)) for s in synonyms]
        seizure = _spellings(entry.name)
        for synonym in synonyms:
            seizure += [(s, w * 0.6 / len(synonyms)) for s, w in _spellings(synonym)[:3]]
        lab = unambiguous(index, lab) or [(entry.name, 1.0)]
        seizure = unambiguous(index, seizure) or [(entry.name, 1.0)]
        substances.append(
            _Substance(
                name=entry.name,
                family=entry.family,
                nps=entry.nps,
                smiles=entry.smiles,
                cas=entry.cas,
                novel=False,
                lab_names=_weighted(lab),
                seizure_names=_weighted(seizure),
            )
        )
    return substances


def _pick(rnd: random.Random, table: tuple[tuple[str, ...], tuple[float, ...]]) -> str:
    values, cumulative = table
    return values[bisect.bisect_right(cumulative, rnd.random() * cumulative[-1])]


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Occurrence:
    """One valid event before serialisation: where, when (UTC seconds), what, and incident label."""

    day: int
    ts: int
    region: int
    substance: int
    kind: int
    incident: int = -1
    first_of_incident: bool = False
    value: float | int = 0
    unit: str = ""
    grams: float = 0.0


@dataclass
class _Plan:
    type: IncidentType
    substance: int
    region: int
    factor: float | None = None
    metric: SpikeMetric | None = None
    baseline_per_day: float | None = None
    window: tuple[int, int] | None = None  # first day, length
    spread_regions: list[int] = field(default_factory=list)


def _offset_text(minutes: int) -> str:
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}"


def _iso(ts: int, offset_minutes: int) -> str:
    local = _NAIVE_EPOCH + timedelta(seconds=ts + offset_minutes * 60)
    return local.isoformat() + _offset_text(offset_minutes)


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class _Generator:
    """One simulation run; the phases are methods so each reads on its own."""

    def __init__(self, config: SimulationConfig, catalogue: Sequence[CatalogueEntry]) -> None:
        if not catalogue:
            raise ValueError("the catalogue is empty: nothing to simulate")
        self.config = config
        self.catalogue = tuple(catalogue)
        self.days = config.days
        self.regions: tuple[Region, ...] = REGIONS
        self.substances = _catalogue_substances(self.catalogue)
        self.n_catalogue = len(self.substances)
        seed = config.seed
        self.np_rng = np.random.default_rng([seed, 0x5157])
        self.rnd_setup = random.Random(f"synthwatch-sim-{seed}-setup")
        self.rnd_time = random.Random(f"synthwatch-sim-{seed}-time")
        self.rnd_plan = random.Random(f"synthwatch-sim-{seed}-plan")
        self.rnd_wire = random.Random(f"synthwatch-sim-{seed}-wire")
        self.day_seconds = [(config.start - _EPOCH_DATE).days * _DAY + d * _DAY for d in range(self.days)]
        self.weekday = [(config.start + timedelta(days=d)).weekday() for d in range(self.days)]
        weights = np.array([r.weight for r in self.regions])
        self.region_share = weights / weights.sum()
        self.occurrences: list[_Occurrence] = []
        self.plans: list[_Plan] = []
        self.mass_by_pair: dict[tuple[int, int], np.ndarray] = {}
        self.quantity_tables = {
            family: (
                tuple(f[0] for f in forms),
                tuple(itertools.accumulate(f[1] for f in forms)),
                tuple((math.log(f[2]), f[3]) for f in forms),
            )
            for family, forms in QUANTITY_FORMS.items()
        }

    # -- baseline ------------------------------------------------------------------------------

    def affinity(self, region: Region, family: str) -> float:
        return region.affinity_overrides.get(family, BLOC_AFFINITY[region.bloc].get(family, 1.0))

    def link(self, a: int, b: int) -> float:
        """How readily a substance present in region ``a`` turns up in region ``b``."""
        ra, rb = self.regions[a], self.regions[b]
        if ra.country == rb.country:
            return 4.0
        if ra.bloc == rb.bloc:
            return 2.0
        return BLOC_LINKS.get(frozenset({ra.bloc, rb.bloc}), 0.2)

    def build_rates(self) -> None:
        """Per region x substance base rates (events/day), and the daily intensity per kind."""
        rnd = self.rnd_setup
        n_regions, n_subst = len(self.regions), self.n_catalogue
        affinity = np.array([[self.affinity(r, s.family) for s in self.substances] for r in self.regions], dtype=float)
        popularity = np.array(
            [rnd.lognormvariate(0, 0.7) if not s.nps else 0.3 * rnd.lognormvariate(0, 0.8) for s in self.substances]
        )
        presence = np.ones((n_regions, n_subst))
        local = np.ones((n_regions, n_subst))
        max_present = max(1, n_regions - 3)
        for j, substance in enumerate(self.substances):
            if not substance.nps:
                continue
            draws = [rnd.random() for _ in range(n_regions)]
            chance = np.minimum(0.85, 0.1 + 0.3 * affinity[:, j])
            present = [i for i in range(n_regions) if draws[i] < chance[i]]
            if not present:  # every NPS circulates somewhere, or it could never "arrive"
                present = [max(range(n_regions), key=lambda i: affinity[i, j] * self.region_share[i] * (1 + draws[i]))]
            if len(present) > max_present:
                present = sorted(present, key=lambda i: -affinity[i, j] * (1 + draws[i]))[:max_present]
            presence[:, j] = 0
            presence[present, j] = 1
            local[:, j] = [rnd.lognormvariate(0, 0.5) for _ in range(n_regions)]
        mix = popularity[None, :] * affinity * presence * local
        totals = mix.sum(axis=1, keepdims=True)
        mix = np.divide(mix, totals, out=np.zeros_like(mix), where=totals > 0)
        self.presence = presence
        self.twin_lists = self.twins()
        self.base = self.config.events_per_day * self.region_share[:, None] * mix  # (R, S)

        # Daily intensities: weekly rhythm per kind, a per region-day reporting noise (gamma, mean 1)
        # and a slow mean-reverting drift per region x substance (log AR(1), mean 1).
        days = self.days
        noise = self.np_rng.gamma(25.0, 1 / 25.0, size=(days, n_regions))
        phi, step = 0.97, 0.04
        stationary = step / math.sqrt(1 - phi * phi)
        drift = np.empty((days, n_regions, n_subst))
        level = self.np_rng.normal(0.0, stationary, size=(n_regions, n_subst))
        for d in range(days):
            drift[d] = level
            level = phi * level + self.np_rng.normal(0.0, step, size=(n_regions, n_subst))
        drift = np.exp(drift - stationary**2 / 2)
        weekly = np.array([[LAB_WEEKLY[w], SEIZURE_WEEKLY[w]] for w in self.weekday])  # (D, 2)
        share = np.array([LAB_SHARE, 1 - LAB_SHARE])
        self.lam = (
            (weekly * share)[:, :, None, None] * (noise[:, None, :, None] * drift[:, None, :, :]) * self.base
        )  # (D, 2, R, S)

    def local_seconds(self, kind: int, rnd: random.Random) -> int:
        """Time of day: labs work office hours, borders and police work round the clock but mostly by day."""
        if kind == _LAB:
            hours = rnd.uniform(8, 18) if rnd.random() < 0.85 else rnd.uniform(0, 24)
        elif rnd.random() < 0.65:
            hours = min(23.99, max(5.0, rnd.gauss(14, 3.5)))
        else:
            hours = rnd.uniform(0, 24)
        return int(hours * _HOUR)

    def incident_seconds(self, rnd: random.Random, first: bool) -> int:
        """Injected events fall in 07:00-22:00 local (first events in 09:00-17:00), so with offsets of
        -08:00..+01:00 they never fall on the UTC day before their local day."""
        return int((rnd.uniform(9, 17) if first else rnd.uniform(7, 22)) * _HOUR)

    def timestamp(self, day: int, region: int, seconds: int) -> int:
        return self.day_seconds[day] + seconds - self.regions[region].utc_offset_minutes * 60

    def draw_quantity(self, occ: _Occurrence, rnd: random.Random) -> None:
        """Heavy-tailed seized amounts: lognormal per form; big loads are written in kg."""
        family = self.substances[occ.substance].family
        units, cumulative, params = self.quantity_tables.get(family, self.quantity_tables["other"])
        k = bisect.bisect_right(cumulative, rnd.random() * cumulative[-1])
        unit = units[k]
        mu, sigma = params[k]
        if unit == "g":
            mu += math.log(self.regions[occ.region].mass_scale)
            if rnd.random() < BULK_SHARE:  # the odd bulk consignment (container, truck): tens to hundreds x
                mu += rnd.uniform(math.log(20), math.log(300))
        amount = rnd.lognormvariate(mu, sigma)
        self.set_amount(occ, unit, amount, rnd)

    @staticmethod
    def set_amount(occ: _Occurrence, unit: str, amount: float, rnd: random.Random) -> None:
        if unit == "g":
            if amount >= 1000 and rnd.random() < 0.85:
                occ.value, occ.unit = max(0.001, round(amount / 1000, 3)), "kg"
                occ.grams = occ.value * 1000
            elif amount < 0.5 and rnd.random() < 0.5:
                occ.value, occ.unit = max(0.1, round(amount * 1000, 1)), "mg"
                occ.grams = occ.value / 1000
            else:
                occ.value, occ.unit = max(0.01, round(amount, 2 if amount < 10 else 1)), "g"
                occ.grams = occ.value
        elif unit in ("tablets", "blotters", "units"):
            occ.value, occ.unit = max(1, round(amount)), unit
        else:
            occ.value, occ.unit = max(0.1, round(amount, 1)), unit

    def add(self, occ: _Occurrence, rnd: random.Random) -> _Occurrence:
        if occ.kind == _SEIZURE and occ.unit == "":
            self.draw_quantity(occ, rnd)
        self.occurrences.append(occ)
        return occ

    def generate_baseline(self) -> None:
        counts = self.np_rng.poisson(self.lam)
        self.pair_counts = counts.sum(axis=1)  # (D, R, S)
        rnd = self.rnd_time
        for d, k, r, s in np.argwhere(counts > 0).tolist():
            for _ in range(int(counts[d, k, r, s])):
                occ = self.add(_Occurrence(d, self.timestamp(d, r, self.local_seconds(k, rnd)), r, s, k), rnd)
                if occ.grams:
                    masses = self.mass_by_pair.get((r, s))
                    if masses is None:
                        masses = self.mass_by_pair[(r, s)] = np.zeros(self.days)
                    masses[d] += occ.grams

    # -- incidents -----------------------------------------------------------------------------

    def pick_day(self, low: int, high: int, rnd: random.Random) -> int | None:
        """A start day in [low, high] that also respects the warm-up, or None."""
        low = max(low, self.config.warmup_days)
        return rnd.randint(low, high) if low <= high else None

    def continuing(
        self, incident: int, substance: int, region: int, first_day: int, rate: float, lab_share: float
    ) -> None:
        """Events of a substance that has just arrived in a region: a low rate ramping up over ~10 days."""
        rnd = self.rnd_time
        for d in range(first_day, self.days):
            ramp = min(1.0, (d - first_day + 2) / 10)
            for kind, share in ((_LAB, lab_share), (_SEIZURE, 1 - lab_share)):
                n = int(self.np_rng.poisson(rate * ramp * share * _WEEKLY[kind][self.weekday[d]]))
                for _ in range(n):
                    ts = self.timestamp(d, region, self.incident_seconds(rnd, first=False))
                    self.add(_Occurrence(d, ts, region, substance, kind, incident), rnd)

    def first_event(self, incident: int, substance: int, region: int, day: int, kind: int) -> None:
        ts = self.timestamp(day, region, self.incident_seconds(self.rnd_time, first=True))
        self.add(_Occurrence(day, ts, region, substance, kind, incident, first_of_incident=True), self.rnd_time)

    def arrival_rate(self, region: int, rnd: random.Random) -> float:
        """Low rate of a newly arrived substance, higher in busy regions."""
        return rnd.uniform(0.06, 0.25) * (0.5 + 10 * float(self.region_share[region]))

    def catalogue_keys(self) -> set[str]:
        keys = set()
        for entry in self.catalogue:
            inchikey = _structure_forms(entry.smiles).inchikey
            if inchikey:
                keys.add(inchikey[:14])
        return keys

    def plan_new_substances(self, count: int) -> None:
        rnd = self.rnd_plan
        taken_keys = self.catalogue_keys()
        taken_names = {_normalise_name(t) for e in self.catalogue for t in (e.name, *e.synonyms)}
        families, cumulative = _weighted(NOVEL_FAMILY_WEIGHTS)
        for _ in range(count):
            day = self.pick_day(0, self.days - 1, rnd)
            if day is None:
                return
            candidate = None
            for _attempt in range(500):
                proposal = propose_novel(_pick(rnd, (families, cumulative)), rnd)
                if proposal is None:
                    continue
                forms = _structure_forms(proposal.smiles)
                key = forms.inchikey[:14] if forms.inchikey else None
                if key is None or key in taken_keys or _normalise_name(proposal.name) in taken_names:
                    continue
                if not _has_core(forms.canonical, family=proposal.family):
                    continue
                taken_keys.add(key)
                taken_names.add(_normalise_name(proposal.name))
                candidate = proposal
                break
            if candidate is None:
                return
            family = candidate.family
            names = _weighted([(candidate.name, 1.0)])
            self.substances.append(
                _Substance(
                    name=candidate.name,
                    family=family,
                    nps=True,
                    smiles=_structure_forms(candidate.smiles).canonical,
                    cas=None,
                    novel=True,
                    lab_names=_weighted(
                        [(candidate.name, 0.85), (f"unidentified {family.replace('_', ' ')} analogue", 0.15)]
                    ),
                    seizure_names=names,
                )
            )
            substance = len(self.substances) - 1
            n_regions = len(self.regions)
            start_weights = [
                float(self.region_share[i]) * self.affinity(self.regions[i], family) for i in range(n_regions)
            ]
            start_region = rnd.choices(range(n_regions), weights=start_weights)[0]
            plan = _Plan("new_substance", substance, start_region, spread_regions=[start_region])
            incident = len(self.plans)
            self.plans.append(plan)
            # Spread: more regions, nearest first, each after an exponential delay.
            others = [i for i in range(n_regions) if i != start_region]
            arrival = day
            schedule = [(start_region, day)]
            for _step in range(rnd.randint(1, 4)):
                weights = [self.link(start_region, i) * (0.3 + 10 * float(self.region_share[i])) for i in others]
                nxt = rnd.choices(others, weights=weights)[0]
                others.remove(nxt)
                arrival += max(1, math.ceil(rnd.expovariate(1 / 9)))
                if arrival >= self.days:
                    break
                schedule.append((nxt, arrival))
            for region, first_day in schedule:
                if region != start_region:
                    plan.spread_regions.append(region)
                self.first_event(incident, substance, region, first_day, _LAB)
                self.continuing(incident, substance, region, first_day + 1, self.arrival_rate(region, rnd), 0.75)

    def plan_first_appearances(self, count: int) -> None:
        rnd = self.rnd_plan
        n_regions = len(self.regions)
        # First baseline day per substance (anywhere); arrival must come at least 2 days later so an
        # event elsewhere precedes it whatever the time zones.
        seen_any = self.pair_counts.sum(axis=1) > 0  # (D, S)
        first_day = [int(np.argmax(seen_any[:, s])) if seen_any[:, s].any() else None for s in range(self.n_catalogue)]
        # Entries sharing a structure key (or a name) are one substance to a detector: a region is
        # only "new" to an entry if none of its twins circulates there.
        twins = self.twin_lists
        candidates: list[tuple[int, int]] = []
        weights: list[float] = []
        for s, substance in enumerate(self.substances[: self.n_catalogue]):
            present = [r for r in range(n_regions) if any(self.presence[r, t] > 0 for t in twins[s])]
            if not substance.nps or first_day[s] is None or not present:
                continue
            for r in range(n_regions):
                if r in present:
                    continue
                link = max(self.link(p, r) for p in present)
                candidates.append((s, r))
                weights.append(link * self.affinity(self.regions[r], substance.family) * (0.2 + self.region_share[r]))
        for _ in range(count):
            if not candidates:
                return
            k = rnd.choices(range(len(candidates)), weights=weights)[0]
            s, r = candidates[k]
            keep = [i for i, (t, q) in enumerate(candidates) if not (q == r and t in twins[s])]
            candidates = [candidates[i] for i in keep]
            weights = [weights[i] for i in keep]
            day = self.pick_day(
                min(first_day[t] or 0 for t in twins[s] if first_day[t] is not None) + 2, self.days - 1, rnd
            )
            if day is None:
                continue
            incident = len(self.plans)
            self.plans.append(_Plan("first_in_region", s, r))
            self.first_event(incident, s, r, day, _LAB if rnd.random() < 0.5 else _SEIZURE)
            self.continuing(incident, s, r, day + 1, self.arrival_rate(r, rnd), LAB_SHARE)

    def twins(self) -> list[list[int]]:
        """For each catalogue entry, the entries (itself included) with its structure key or a shared name."""
        keys = [(_structure_forms(s.smiles).inchikey or "")[:14] for s in self.substances[: self.n_catalogue]]
        names = [{_normalise_name(t) for t in (e.name, *e.synonyms)} for e in self.catalogue]
        return [
            [t for t in range(self.n_catalogue) if t == s or (keys[s] and keys[s] == keys[t]) or names[s] & names[t]]
            for s in range(self.n_catalogue)
        ]

    def mass_form(self, family: str) -> tuple[float, float, float]:
        """(share of seizures weighed in grams, median g, sigma) for a family."""
        forms = QUANTITY_FORMS.get(family, QUANTITY_FORMS["other"])
        total = sum(f[1] for f in forms)
        for unit, weight, median, sigma in forms:
            if unit == "g":
                return weight / total, median, sigma
        return 0.0, 1.0, 1.0

    def plan_spikes(self, count: int) -> None:
        rnd = self.rnd_plan
        busy: dict[tuple[int, int], list[tuple[int, int]]] = {}
        lam_pair = self.lam.sum(axis=1)  # (D, R, S)
        seizure_lam = self.lam[:, _SEIZURE]
        pairs = [(r, s) for r in range(len(self.regions)) for s in range(self.n_catalogue) if self.base[r, s] > 0]
        if not pairs:
            return
        for _ in range(count):
            metric: SpikeMetric = "quantity" if rnd.random() < 0.35 else "count"
            length = rnd.randint(2, 7)
            factor = rnd.choice((2.0, 2.5, 3.0, 3.0, 4.0, 4.0, 5.0, 6.0, 8.0))
            if metric == "quantity":
                factor = round(rnd.uniform(10, 50), 1)
                gram_share = {s: self.mass_form(self.substances[s].family)[0] for s in range(self.n_catalogue)}
                usable = [(r, s) for r, s in pairs if gram_share[s] >= 0.5]
                expected = [float(self.base[r, s]) * (1 - LAB_SHARE) * gram_share[s] * length for r, s in usable]
                pool = [
                    (p, 1.0 + self.substances[p[1]].nps)
                    for p, e in zip(usable, expected, strict=True)
                    if 0.2 <= e <= 4.0
                ]
                if not pool:
                    metric, factor = "count", 4.0
            if metric == "count":
                need = max(4.0, 8.0 / (factor - 1)) / length
                pool = [
                    ((r, s), float(self.base[r, s]) * (1.0 + self.substances[s].nps))
                    for r, s in pairs
                    if self.base[r, s] >= need
                ]
                if not pool:
                    pool = [(max(pairs, key=lambda p: float(self.base[p])), 1.0)]
            for _attempt in range(40):
                (r, s) = rnd.choices([p for p, _ in pool], weights=[w for _, w in pool])[0]
                d0 = self.pick_day(length, self.days - length, rnd)
                if d0 is None:  # run too short for a spike this long (with its reference window)
                    break
                span = (d0 - length, d0 + length)
                group = (r, min(self.twin_lists[s]))
                if any(a < span[1] and span[0] < b for a, b in busy.get(group, [])):
                    continue
                if self.inject_spike(r, s, d0, length, factor, metric, lam_pair, seizure_lam, rnd):
                    busy.setdefault(group, []).append(span)
                    break

    def inject_spike(
        self,
        r: int,
        s: int,
        d0: int,
        length: int,
        factor: float,
        metric: SpikeMetric,
        lam_pair: np.ndarray,
        seizure_lam: np.ndarray,
        rnd: random.Random,
    ) -> bool:
        """Add the spike's events if they make the window clearly stand out against the window
        before it (an invisible injected spike would be a wrong label); report whether it did."""
        window = range(d0, d0 + length)
        incident = len(self.plans)
        extra: list[_Occurrence] = []
        if metric == "count":
            for d in window:
                for kind in (_LAB, _SEIZURE):
                    n = int(self.np_rng.poisson((factor - 1) * self.lam[d, kind, r, s]))
                    for _ in range(n):
                        ts = self.timestamp(d, r, self.incident_seconds(self.rnd_time, first=False))
                        extra.append(_Occurrence(d, ts, r, s, kind, incident))
            twins = self.twin_lists[s]
            before = int(self.pair_counts[d0 - length : d0, r, twins].sum())
            during = int(self.pair_counts[d0 : d0 + length, r, twins].sum()) + len(extra)
            visible = bool(extra) and during >= 1.5 * before + 3
            baseline = float(lam_pair[d0 : d0 + length, r, s].mean())
        else:
            _, median, sigma = self.mass_form(self.substances[s].family)
            usual = median * self.regions[r].mass_scale * math.exp(sigma * sigma / 2)
            for _ in range(rnd.randint(3, 5)):
                d = rnd.randint(d0, d0 + length - 1)
                ts = self.timestamp(d, r, self.incident_seconds(self.rnd_time, first=False))
                occ = _Occurrence(d, ts, r, s, _SEIZURE, incident)
                grams = usual * factor * rnd.uniform(0.8, 1.25)
                if grams >= 1000:
                    occ.value, occ.unit, occ.grams = round(grams / 1000, 2), "kg", round(grams / 1000, 2) * 1000
                else:
                    occ.value, occ.unit, occ.grams = round(grams, 1), "g", round(grams, 1)
                extra.append(occ)
            masses = np.zeros(self.days)
            for twin in self.twin_lists[s]:
                masses = masses + self.mass_by_pair.get((r, twin), 0.0)
            before_mass = float(masses[d0 - length : d0].sum())
            during_mass = float(masses[d0 : d0 + length].sum()) + sum(o.grams for o in extra)
            visible = during_mass >= 2 * before_mass
            gram_share = self.mass_form(self.substances[s].family)[0]
            baseline = float(seizure_lam[d0 : d0 + length, r, s].mean()) * gram_share * usual
        if not visible:
            return False
        self.plans.append(
            _Plan("spike", s, r, factor=factor, metric=metric, baseline_per_day=round(baseline, 4), window=(d0, length))
        )
        for occ in extra:
            self.add(occ, self.rnd_time)
        return True

    # -- wire ----------------------------------------------------------------------------------

    def build_sources(self) -> None:
        """Each lab and agency writes times either in UTC or in local time, consistently."""
        rnd = self.rnd_setup
        self.writes_utc: dict[str, bool] = {}
        for region in self.regions:
            for lab in region.labs:
                self.writes_utc.setdefault(lab, rnd.random() < 0.4)
            for agency in region.agencies:
                self.writes_utc.setdefault(f"{region.code}/{agency.code}", rnd.random() < 0.4)
            if all(self.writes_utc[lab] for lab in region.labs) and all(
                self.writes_utc[f"{region.code}/{agency.code}"] for agency in region.agencies
            ):  # every region has some source writing its local offset
                self.writes_utc[region.labs[0]] = False
        self.lab_seq: dict[str, int] = {}
        self.seizure_seq: dict[str, int] = {}

    def lab_record(self, occ: _Occurrence, event_id: str, rnd: random.Random) -> tuple[dict[str, Any], int]:
        region = self.regions[occ.region]
        substance = self.substances[occ.substance]
        lab = rnd.choice(region.labs)
        offset = 0 if self.writes_utc[lab] else region.utc_offset_minutes
        year = (_NAIVE_EPOCH + timedelta(seconds=occ.ts)).year
        seq = self.lab_seq[lab] = self.lab_seq.get(lab, 0) + 1
        forms = _structure_forms(substance.smiles)
        u = rnd.random()
        inchikey = None
        if u < 0.45:
            smiles = forms.canonical
        elif u < 0.6:
            smiles = substance.smiles
        elif u < 0.85 or substance.family not in SALT_FAMILIES:
            smiles = rnd.choice(forms.variants)
        else:
            salt = rnd.choice(SALTS)
            if _structure_forms(salt).heavy_atoms * 2 > forms.heavy_atoms:
                salt = "Cl"
            base = forms.canonical if rnd.random() < 0.6 else rnd.choice(forms.variants)
            smiles = f"{base}.{salt}" if rnd.random() < 0.8 else f"{salt}.{base}"
        if "." not in smiles and forms.inchikey and rnd.random() < (0.7 if occ.first_of_incident else 0.3):
            inchikey = forms.inchikey
        report: dict[str, Any] = {"name": _pick(rnd, substance.lab_names), "smiles": smiles}
        if inchikey:
            report["inchikey"] = inchikey
        if substance.cas and rnd.random() < 0.1:
            report["cas"] = substance.cas
        u = rnd.random()
        if occ.first_of_incident or u < 0.82:
            sample_type = "seized_material"
        elif u < 0.9:
            sample_type = "drug_checking" if region.drug_checking else "seized_material"
        elif u < 0.97:
            sample_type = "biological"
        elif u < 0.99:
            sample_type = "wastewater"
        else:
            sample_type = "other"
        if substance.novel and (occ.first_of_incident or rnd.random() < 0.5):
            method = rnd.choice(("LC-HRMS", "NMR", "LC-HRMS"))
        else:
            u = rnd.random()
            method = (
                "GC-MS"
                if u < 0.45
                else "LC-HRMS"
                if u < 0.65
                else "LC-MS/MS"
                if u < 0.8
                else ("FTIR" if u < 0.92 else "NMR")
            )
        record: dict[str, Any] = {
            "kind": "lab_detection",
            "event_id": event_id,
            "occurred_at": _iso(occ.ts, offset),
            "reported_at": "",
            "country": region.country,
            "region": region.code,
            "substance": report,
            "lab_id": lab,
            "sample_id": f"{lab}-{year % 100:02d}-{seq:05d}",
            "sample_type": sample_type,
            "method": method,
            "confirmed": occ.first_of_incident or rnd.random() < 0.94,
        }
        if sample_type in ("seized_material", "drug_checking") and rnd.random() < 0.7:
            a, b = PURITY.get(substance.family, (4.0, 4.0))
            record["purity_pct"] = min(99.9, max(0.1, round(rnd.betavariate(a, b) * 100, 1)))
        return record, offset

    def seizure_record(self, occ: _Occurrence, event_id: str, rnd: random.Random) -> tuple[dict[str, Any], int]:
        region = self.regions[occ.region]
        substance = self.substances[occ.substance]
        points = region.border_points
        point = rnd.choices(points, weights=[p.weight for p in points])[0]
        agency: Agency = region.agencies[rnd.choice(point.agencies)]
        offset = 0 if self.writes_utc[f"{region.code}/{agency.code}"] else region.utc_offset_minutes
        year = (_NAIVE_EPOCH + timedelta(seconds=occ.ts)).year
        seq = self.seizure_seq[agency.code] = self.seizure_seq.get(agency.code, 0) + 1
        report: dict[str, Any] = {"name": _pick(rnd, substance.seizure_names)}
        if substance.cas and rnd.random() < 0.05:
            report["cas"] = substance.cas
        record: dict[str, Any] = {
            "kind": "border_seizure",
            "event_id": event_id,
            "occurred_at": _iso(occ.ts, offset),
            "reported_at": "",
            "country": region.country,
            "region": region.code,
            "substance": report,
            "agency": agency.name,
            "seizure_id": f"{agency.code}-{year}-{seq:06d}",
            "border_point": point.name,
            "conveyance": point.conveyance,
            "quantity": {"value": occ.value, "unit": occ.unit},
        }
        if rnd.random() < 0.8:
            origins = ORIGINS.get(substance.family, ORIGINS["other"])
            origin = rnd.choices([o for o, _ in origins], weights=[w for _, w in origins])[0]
            if origin != region.country:
                record["origin_country"] = origin
        if rnd.random() < 0.75 or not region.transit_destinations:
            destination = region.country
        else:
            destination = rnd.choice(region.transit_destinations)
        if record.get("origin_country") != destination:
            record["destination_country"] = destination
        return record, offset

    def malformed_line(self, kind: MalformedKind, base: dict[str, Any], event_id: str, rnd: random.Random) -> str:
        record = json.loads(json.dumps(base))
        record["event_id"] = event_id
        if kind == "bad_region_code":
            region = self.regions[[r.code for r in self.regions].index(record["region"])]
            record["region"] = rnd.choice(
                (f"{region.country}-XX", f"{region.country}-99", region.name, region.code.replace("-", ""))
            )
        elif kind == "region_of_other_country":
            record["region"] = rnd.choice([r.code for r in self.regions if r.country != record["country"]])
        elif kind == "negative_quantity":
            record["quantity"]["value"] = rnd.choice((-record["quantity"]["value"], 0))
        elif kind == "unknown_kind":
            record["kind"] = rnd.choice(("lab_result", "seizure", "wastewater_sample", "LabDetection"))
        elif kind == "blank_substance_name":
            record["substance"]["name"] = rnd.choice(("", "   ", "\t"))
        elif kind == "naive_timestamp":
            record["occurred_at"] = record["occurred_at"][:-6]
        elif kind == "missing_required_field":
            required = ["event_id", "occurred_at", "country", "region", "substance", "kind"]
            required += (
                ["lab_id", "sample_id", "sample_type", "method"]
                if record["kind"] == "lab_detection"
                else ["agency", "seizure_id", "border_point", "conveyance", "quantity"]
            )
            del record[rnd.choice(required)]
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        if kind == "truncated_json":
            line = line[: rnd.randint(len(line) // 4, len(line) - 2)]
        return line

    def assemble(self) -> Simulation:
        """Serialise in event-time order (ids and sequence numbers follow time), then shuffle into
        arrival order: report delays, late and very late arrivals, re-sends and malformed lines."""
        config = self.config
        seed = config.seed
        self.occurrences.sort(key=lambda o: (o.ts, o.region, o.substance, o.kind, o.incident, o.value))
        self.build_sources()
        rnd = self.rnd_wire
        items: list[tuple[int, int, str, _LineStatus, str | None]] = []
        event_ids: list[str] = []
        late_ids: list[str] = []
        very_late_ids: list[str] = []
        seizure_records: list[dict[str, Any]] = []
        all_records: list[dict[str, Any]] = []
        very_late_cut = config.very_late_fraction
        late_cut = very_late_cut + config.late_fraction
        for n, occ in enumerate(self.occurrences, start=1):
            event_id = f"sim-{seed}-{n:08d}"
            event_ids.append(event_id)
            record, offset = (self.lab_record if occ.kind == _LAB else self.seizure_record)(occ, event_id, rnd)
            u = rnd.random()
            if u < very_late_cut:
                delay = int(rnd.uniform(25, 72) * _HOUR)
                very_late_ids.append(event_id)
            elif u < late_cut:
                delay = int(rnd.uniform(1.5, 20) * _HOUR)
                late_ids.append(event_id)
            else:
                delay = 60 + int(min(rnd.expovariate(1 / 900), 3240))
            record["reported_at"] = _iso(occ.ts + delay, offset)
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
            items.append((occ.ts + delay, n, line, "event", event_id))
            all_records.append(record)
            if occ.kind == _SEIZURE:
                seizure_records.append(record)
        valid = len(items)
        n_dup = int(valid * config.duplicate_fraction + 0.5) if valid else 0
        for j, original in enumerate(sorted(rnd.sample(range(valid), n_dup)) if n_dup else []):
            ts, _, line, _, original_id = items[original]
            delay = 1 + int(rnd.expovariate(1 / 1800))
            items.append((ts + delay, valid + j + 1, line, "duplicate", original_id))
        total_good = valid + n_dup
        mf = config.malformed_fraction
        n_bad = int(total_good * mf / (1 - mf) + 0.5) if total_good else 0
        kinds: list[MalformedKind] = []
        while len(kinds) < n_bad:
            batch = list(MALFORMED_KINDS)
            rnd.shuffle(batch)
            kinds.extend(batch)
        first_ts = self.day_seconds[0]
        last_ts = self.day_seconds[-1] + _DAY
        bad_ids: dict[int, tuple[MalformedKind, str | None]] = {}
        for j, kind in enumerate(kinds[:n_bad]):
            if kind == "negative_quantity" and not seizure_records:
                kind = "blank_substance_name"
            base = rnd.choice(seizure_records if kind == "negative_quantity" else all_records)
            bad_id = f"sim-{seed}-bad{j + 1:06d}"
            line = self.malformed_line(kind, base, bad_id, rnd)
            try:
                parse_event(line)
            except WireError:
                pass
            else:  # pragma: no cover - a bug in malformed_line
                raise AssertionError(f"malformed line of kind {kind} passed validation: {line}")
            tiebreak = total_good + j + 1
            kept_id = bad_id if bad_id in line else None
            bad_ids[tiebreak] = (kind, kept_id)
            items.append((rnd.randint(first_ts, last_ts), tiebreak, line, "malformed", kept_id))
        items.sort(key=lambda item: (item[0], item[1]))
        malformed = [
            MalformedLine(line=i + 1, kind=bad_ids[item[1]][0], event_id=bad_ids[item[1]][1])
            for i, item in enumerate(items)
            if item[3] == "malformed"
        ]
        return Simulation(
            lines=[item[2] for item in items],
            truth=Truth(
                config=config,
                catalogue_size=self.n_catalogue,
                lines=len(items),
                valid_unique=valid,
                malformed=len(malformed),
                duplicates=n_dup,
                late=len(late_ids),
                very_late=len(very_late_ids),
                incidents=self.incidents(event_ids),
                malformed_kinds=malformed,
                late_event_ids=late_ids,
                very_late_event_ids=very_late_ids,
            ),
            statuses=[item[3] for item in items],
        )

    def incidents(self, event_ids: list[str]) -> list[Incident]:
        members: dict[int, list[int]] = {}
        for n, occ in enumerate(self.occurrences):
            if occ.incident >= 0:
                members.setdefault(occ.incident, []).append(n)
        result = []
        for index, plan in enumerate(self.plans):
            rows = members.get(index, [])
            if not rows:
                continue
            substance = self.substances[plan.substance]
            region = self.regions[plan.region]
            forms = _structure_forms(substance.smiles)
            incident = Incident(
                incident_id="",
                type=plan.type,
                substance_name=substance.name,
                smiles=substance.smiles,
                inchikey=forms.inchikey,
                family=substance.family,
                region=region.code,
                country=region.country,
                start=_utc(self.occurrences[rows[0]].ts),
                event_ids=[event_ids[n] for n in rows],
            )
            if plan.type == "spike" and plan.window is not None:
                d0, length = plan.window
                offset = region.utc_offset_minutes * 60
                incident.end = _utc(self.occurrences[rows[-1]].ts)
                incident.window_start = _utc(self.day_seconds[d0] - offset)
                incident.window_end = _utc(self.day_seconds[d0] + length * _DAY - offset)
                incident.factor = plan.factor
                incident.metric = plan.metric
                incident.baseline_per_day = plan.baseline_per_day
            if plan.type == "new_substance":
                for spread_region in plan.spread_regions:
                    first = next(n for n in rows if self.occurrences[n].region == spread_region)
                    other = self.regions[spread_region]
                    incident.spread.append(
                        SpreadStep(
                            region=other.code,
                            country=other.country,
                            first_seen=_utc(self.occurrences[first].ts),
                            event_id=event_ids[first],
                        )
                    )
            result.append(incident)
        result.sort(key=lambda i: (i.start, i.type, i.region, i.substance_name))
        for k, incident in enumerate(result, start=1):
            incident.incident_id = f"inc-{self.config.seed}-{k:03d}"
        return result

    def run(self) -> Simulation:
        new, first, spikes = self.config.incident_counts()
        self.build_rates()
        self.generate_baseline()
        self.plan_new_substances(new)
        self.plan_first_appearances(first)
        self.plan_spikes(spikes)
        return self.assemble()


def simulate(config: SimulationConfig, catalogue: Sequence[CatalogueEntry] | None = None) -> Simulation:
    """Generate the stream and its truth for ``config`` (catalogue: the shipped one by default).

    Deterministic: the same config and catalogue always give byte-identical lines and truth.
    """
    return _Generator(config, shipped_catalogue() if catalogue is None else catalogue).run()
