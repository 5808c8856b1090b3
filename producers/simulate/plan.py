"""The plan of a run: arrival rates, the baseline occurrences, and the injected incidents (new substances,
first appearances, spikes) with the occurrences that make them."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from synthwatch.catalogue import CatalogueEntry
from synthwatch.producers.simulate.models import (
    _DAY,
    _EPOCH_DATE,
    _HOUR,
    _LAB,
    _NAIVE_EPOCH,
    _SEIZURE,
    _WEEKLY,
    BULK_SHARE,
    LAB_SHARE,
    LAB_WEEKLY,
    SEIZURE_WEEKLY,
    IncidentType,
    SimulationConfig,
    SpikeMetric,
)
from synthwatch.producers.simulate.substances import (
    _catalogue_substances,
    _has_core,
    _normalise_name,
    _pick,
    _structure_forms,
    _Substance,
    _weighted,
)
from synthwatch.producers.simulate_templates import (
    BLOC_AFFINITY,
    BLOC_LINKS,
    NOVEL_FAMILY_WEIGHTS,
    QUANTITY_FORMS,
    REGIONS,
    Region,
    propose_novel,
)


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


class _Planner:
    """One simulation run's plan: the phases are methods so each reads on its own."""

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
