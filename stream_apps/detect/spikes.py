"""Spike detection on sparse daily series (region × substance, region × family).

Most series are zero on most days, so a z-score over a 7-day window (EARS C1/C2/C3) false-alarms
constantly. Instead, each series learns its own rate from its history and asks how surprising the
recent count is over several window lengths (Farrington-style: a day-of-week adjusted rate, a guard
band so an ongoing spike does not inflate its own baseline, earlier outlying days capped, a shrunk
overdispersion factor). The rate is only known from the reports it was learnt from, so the tail is
the negative binomial predictive, not Poisson: sparse series do not cry wolf. It decides intra-day:
the current day is compared with a *full* day's expectation, so an alert fires on the report that
makes the evidence cross the threshold.

Seized mass has its own test: are several of the window's seizures improbably far above the series'
robust (median/MAD) log-mass - or, for a series with little history, its region × family's?

Everything here is pure and synchronous; state is plain data so it can live in a Faust table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mypy_extensions import mypyc_attr

from synthwatch.stream_apps.detect.config import SpikeConfig

#: The builtin ``sum`` over floats, called as a plain function. Compiled by mypyc, ``sum()`` of floats raised
#: ``TypeError: int object expected; got float`` (it kept an int accumulator); through this name the compiled
#: and the pure module both run Python's own ``sum``, so both add the same floats in the same order.
_sum_floats: Callable[[Iterable[float]], float] = sum


def poisson_sf(k: float, mean: float) -> float:
    """P(X >= k) for X ~ Poisson(mean); exact summation of the lower tail (k is small here)."""
    if k <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    k_int = math.ceil(k)
    term = math.exp(-mean)
    lower = 0.0
    for i in range(k_int):
        lower += term
        term *= mean / (i + 1)
    return max(0.0, 1.0 - lower) if lower < 0.999999 else _upper_tail(k_int, mean)


def gamma_poisson_sf(k: float, shape: float, scale: float) -> float:
    """P(X >= k) for X ~ Poisson(L), L ~ Gamma(shape, scale): the negative binomial.

    It is the predictive count of a window when the rate is only known from ``shape`` events over
    an exposure of ``1 / scale`` windows: a series with three reports in eight weeks does not know
    its rate well enough to call three reports in a day impossible.
    """
    if k <= 0:
        return 1.0
    if scale <= 0:
        return 0.0
    k_int = math.ceil(k)
    q = scale / (1 + scale)
    log_p0 = -shape * math.log1p(scale)
    term, lower = math.exp(log_p0), 0.0
    for i in range(k_int):
        lower += term
        term *= (i + shape) / (i + 1) * q
    if lower < 0.999999:
        return max(0.0, 1.0 - lower)
    log_term = math.lgamma(k_int + shape) - math.lgamma(shape) - math.lgamma(k_int + 1) + log_p0 + k_int * math.log(q)
    total, term, i = 0.0, math.exp(log_term), k_int
    while term > total * 1e-12 and i < k_int + 10_000:
        total += term
        term *= (i + shape) / (i + 1) * q
        i += 1
    return total


def _upper_tail(k: int, mean: float) -> float:
    """Sum the upper tail directly when the lower tail is too close to 1 for subtraction."""
    log_term = -mean + k * math.log(mean) - math.lgamma(k + 1)
    total, term, i = 0.0, math.exp(log_term), k
    while term > total * 1e-12 and i < k + 10_000:
        total += term
        i += 1
        term *= mean / i
    return total


@dataclass(slots=True)
class Episode:
    """An alerted period of one series and metric; ends after ``cooldown_days`` without evidence."""

    start_day: int
    last_day: int


@dataclass(slots=True)
class SpikeFinding:
    """Evidence that crossed the threshold (the caller turns it into an alert)."""

    metric: str  # "count" or "quantity"
    window_days: int
    observed: float
    expected: float
    score: float  # -log10 of the tail probability (capped), or robust z for mass
    episode_start: int
    window_start_day: int
    window_end_day: int
    new_episode: bool  # only the first finding of an episode becomes an alert
    mass_z: float | None = None  # mass spikes: robust z of the seizure that made it


_DAYS: dict[int, int] = {}


#: Evidence ids a series keeps (the newest): what a spike alert can cite of its window.
EVIDENCE_KEPT = 64


def intern_day(day: int) -> int:
    """One int object per day number: a series holds a day in its counts, masses and evidence, and the
    5,000 series of a region stage repeat the same few dozen days (28 bytes each time otherwise)."""
    return _DAYS.setdefault(day, day)


@dataclass(slots=True)
class SeriesState:
    """History of one daily series, written to a changelog as a full record plus a small delta.

    After a batch, only what changed since the last full record is written (:meth:`changelog_record`):
    days whose count or grams changed, masses and evidence appended, how many fell off the front, the
    pruning cut. The full record is rewritten when that delta grows past a few dozen items, so the cost
    of a write does not grow with the history a series holds.
    """

    first_day: int
    counts: dict[int, int] = field(default_factory=dict)
    grams: dict[int, float] = field(default_factory=dict)
    # Seizure masses (day, log grams) and evidence (day, event id), most recent last, as parallel lists
    # (two references an item instead of a tuple: 48 bytes less, times ~120 items, times 5,000 series).
    mass_days: list[int] = field(default_factory=list)
    mass_values: list[float] = field(default_factory=list)
    episodes: dict[str, Episode] = field(default_factory=dict)
    evidence_days: list[int] = field(default_factory=list)
    evidence_ids: list[str] = field(default_factory=list)
    # The baseline of the current day (it ends 8 days back, so reports arriving today - never more than
    # the lateness old - cannot change it) and the last day pruned. Persisted, though they only save work:
    # a report from a lagging topic can change the baseline's days, and a restored state must not see that
    # where the live one, holding the baseline learnt earlier, does not.
    cached_baseline: tuple[int, list[Any] | None] | None = None
    pruned_day: int | None = None
    newest_day: int | None = None  # not persisted either: max(counts), kept as reports come in
    oldest_day: int | None = None  # not persisted either: min(counts), kept as reports come in
    # Changelog bookkeeping (no effect on detection): what changed since the full record ``gen``.
    gen: int = 0
    full_due: bool = True  # no full record of this state written yet (new, or restored)
    changed_counts: dict[int, None] = field(default_factory=dict)  # in order of first change
    changed_grams: dict[int, None] = field(default_factory=dict)
    added_masses: int = 0
    base_masses: int = 0  # len(masses) in the full record
    added_evidence: int = 0
    base_evidence: int = 0
    cut: int | None = None  # days before this were pruned after the full record
    # Per input partition, the offset of the last event this series took (see stream_apps/detect/replay.py).
    applied: dict[str, int] = field(default_factory=dict)
    # The worker's outbox (see RegionDetector.outbox): JSON of the spike alerts this series raised, written
    # with the state that decided them and sent only once that record is acknowledged; removed once sent.
    outbox: list[str] = field(default_factory=list)
    sending: int = 0  # not persisted: how many of the outbox's first entries a checkpoint is sending

    @property
    def masses(self) -> list[tuple[int, float]]:
        """(day, log grams) pairs, most recent last (a copy)."""
        return list(zip(self.mass_days, self.mass_values, strict=True))

    @property
    def evidence(self) -> list[tuple[int, str]]:
        """(day, event id) pairs, most recent last (a copy)."""
        return list(zip(self.evidence_days, self.evidence_ids, strict=True))

    def add_mass(self, day: int, log_mass: float, memory: int) -> None:
        """Append a seizure's log mass, keeping the ``memory`` most recent."""
        days, values = self.mass_days, self.mass_values
        days.append(day)
        values.append(log_mass)
        self.added_masses += 1
        if len(values) > memory:
            del days[:-memory]
            del values[:-memory]

    def to_dict(self) -> dict[str, Any]:
        """The full record: parallel lists sharing their items with the live state (cheap to build and hold)."""
        counts, grams = self.counts, self.grams
        return {
            "g": self.gen,
            "f": self.first_day,
            "c": [list(counts), list(counts.values())],
            "gr": [list(grams), list(grams.values())],
            "m": [self.mass_days[:], self.mass_values[:]],
            "e": {k: [v.start_day, v.last_day] for k, v in self.episodes.items()},
            "v": [self.evidence_days[:], self.evidence_ids[:]],
            "b": self._baseline_record(),
            "p": self.pruned_day,
            "a": dict(self.applied),
            **self._outbox_record(),
        }

    def _outbox_record(self) -> dict[str, Any]:
        """The outbox, whole, in full records and deltas alike (no key when empty: records stay as before)."""
        return {"x": self.outbox[:]} if self.outbox else {}

    def _baseline_record(self) -> list[Any] | None:
        cached = self.cached_baseline
        if cached is None:
            return None
        return [cached[0], list(cached[1]) if cached[1] is not None else None]

    def delta_dict(self) -> dict[str, Any]:
        """What changed since the full record ``gen`` (see :meth:`from_records`)."""
        counts, grams = self.counts, self.grams
        added_m, added_v = self.added_masses, self.added_evidence
        n_m, n_v = len(self.mass_values), len(self.evidence_ids)
        return {
            "g": self.gen,
            "f": self.first_day,
            "o": self.cut,
            "c": [list(self.changed_counts), [counts[d] for d in self.changed_counts]],
            "gr": [list(self.changed_grams), [grams[d] for d in self.changed_grams]],
            "m": [self.mass_days[n_m - added_m :], self.mass_values[n_m - added_m :]] if added_m else [[], []],
            "md": self.base_masses + added_m - n_m,
            "e": {k: [v.start_day, v.last_day] for k, v in self.episodes.items()},
            "v": [self.evidence_days[n_v - added_v :], self.evidence_ids[n_v - added_v :]] if added_v else [[], []],
            "vd": self.base_evidence + added_v - n_v,
            "b": self._baseline_record(),
            "p": self.pruned_day,
            "a": dict(self.applied),
            **self._outbox_record(),
        }

    def changelog_record(self, delta_limit: int = 32) -> tuple[bool, dict[str, Any]]:
        """(full?, record) to write now: the delta, or a new full record once the delta is large."""
        size = len(self.changed_counts) + len(self.changed_grams) + self.added_masses + self.added_evidence
        if (
            not self.full_due
            and size <= delta_limit
            and self.added_masses <= len(self.mass_values)
            and self.added_evidence <= len(self.evidence_ids)
        ):
            return False, self.delta_dict()
        self.gen += 1
        self.full_due = False
        self.changed_counts.clear()
        self.changed_grams.clear()
        self.added_masses = self.added_evidence = 0
        self.base_masses, self.base_evidence = len(self.mass_values), len(self.evidence_ids)
        self.cut = None
        return True, self.to_dict()

    @classmethod
    def from_records(cls, full: dict[str, Any], delta: dict[str, Any] | None = None) -> SeriesState:
        """The state the live one had when ``full`` and then ``delta`` (if of the same ``gen``) were written."""
        if "gr" not in full:  # a record of the previous format (one whole record per series) from a changelog
            return cls._from_whole_record(full)
        counts = dict(zip(*full["c"], strict=True))
        grams = dict(zip(*full["gr"], strict=True))
        (mass_days, mass_values), (evidence_days, evidence_ids) = full["m"], full["v"]
        episodes, first_day = full["e"], full["f"]
        baseline, pruned_day, marks = full.get("b"), full.get("p"), full.get("a")
        outbox = full.get("x") or []
        if delta is not None and delta["g"] == full["g"]:
            cut = delta["o"]
            if cut is not None:
                counts = {d: n for d, n in counts.items() if d >= cut}
                grams = {d: g for d, g in grams.items() if d >= cut}
            counts.update(zip(*delta["c"], strict=True))
            grams.update(zip(*delta["gr"], strict=True))
            dropped_m, dropped_v = delta["md"], delta["vd"]
            mass_days = [*mass_days, *delta["m"][0]][dropped_m:]
            mass_values = [*mass_values, *delta["m"][1]][dropped_m:]
            evidence_days = [*evidence_days, *delta["v"][0]][dropped_v:]
            evidence_ids = [*evidence_ids, *delta["v"][1]][dropped_v:]
            episodes, first_day, baseline, pruned_day = delta["e"], delta["f"], delta["b"], delta["p"]
            marks = delta.get("a")
            outbox = delta.get("x") or []
        return cls(
            first_day=int(first_day),
            counts={intern_day(int(d)): int(n) for d, n in counts.items()},
            grams={intern_day(int(d)): float(g) for d, g in grams.items()},
            mass_days=[intern_day(int(d)) for d in mass_days],
            mass_values=[float(v) for v in mass_values],
            episodes={k: Episode(int(v[0]), int(v[1])) for k, v in episodes.items()},
            evidence_days=[intern_day(int(d)) for d in evidence_days],
            evidence_ids=[str(i) for i in evidence_ids],
            cached_baseline=(baseline[0], list(baseline[1]) if baseline[1] is not None else None) if baseline else None,
            pruned_day=pruned_day,
            gen=int(full["g"]),
            applied={str(k): int(v) for k, v in marks.items()} if marks else {},
            outbox=[str(a) for a in outbox],
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesState:
        return cls.from_records(data)

    def heal(self, last_day: int) -> tuple[list[int], int | None] | None:
        """Take out the days after ``last_day`` (the day of the latest event time the intake takes now): a report
        dated 2099, taken before the intake bounded event times, in a state recovered from the changelogs. Returns
        (the days dropped, ascending; the far-future pruning day forgotten, if any), or None if nothing changed.

        Its count, mass, grams and evidence go; an episode it started goes, one it prolonged ends on
        ``last_day`` at the latest; a cached baseline and a pruning of such a day are forgotten (learnt again); the
        first day is taken back to a kept one. The state is written as a full record next. What the pruning at
        that day dropped (the series' older days) stays lost.
        """
        days = sorted({d for d in (*self.counts, *self.grams, *self.mass_days, *self.evidence_days) if d > last_day})
        episodes = [k for k, e in self.episodes.items() if e.last_day > last_day]
        baseline = self.cached_baseline is not None and self.cached_baseline[0] > last_day
        pruned = self.pruned_day if self.pruned_day is not None and self.pruned_day > last_day else None
        if not days and not episodes and not baseline and pruned is None and self.first_day <= last_day:
            return None
        self.counts = {d: n for d, n in self.counts.items() if d <= last_day}
        self.grams = {d: g for d, g in self.grams.items() if d <= last_day}
        masses = [(d, v) for d, v in zip(self.mass_days, self.mass_values, strict=True) if d <= last_day]
        self.mass_days, self.mass_values = [d for d, _ in masses], [v for _, v in masses]
        evidence = [(d, i) for d, i in zip(self.evidence_days, self.evidence_ids, strict=True) if d <= last_day]
        self.evidence_days, self.evidence_ids = [d for d, _ in evidence], [i for _, i in evidence]
        for key in episodes:
            episode = self.episodes[key]
            if episode.start_day > last_day:
                del self.episodes[key]
            else:
                episode.last_day = last_day
        if baseline:
            self.cached_baseline = None
        if pruned is not None:
            self.pruned_day = None
        if self.first_day > last_day:
            self.first_day = min(self.counts) if self.counts else last_day
        self.newest_day = self.oldest_day = None
        self.full_due = True
        return days, pruned

    @classmethod
    def _from_whole_record(cls, data: dict[str, Any]) -> SeriesState:
        """The previous format: pairs ``[[day, n], ...]`` and no generation (written in full next time)."""
        masses = [(intern_day(int(d)), float(v)) for d, v in data.get("m", [])]
        evidence = [(intern_day(int(d)), str(i)) for d, i in data.get("v", [])]
        return cls(
            first_day=int(data["f"]),
            counts={intern_day(int(d)): int(n) for d, n in data.get("c", [])},
            grams={intern_day(int(d)): float(g) for d, g in data.get("g", [])},
            mass_days=[d for d, _ in masses],
            mass_values=[v for _, v in masses],
            episodes={k: Episode(int(v[0]), int(v[1])) for k, v in data.get("e", {}).items()},
            evidence_days=[d for d, _ in evidence],
            evidence_ids=[i for _, i in evidence],
        )

    def prune(self, today: int, keep_days: int) -> None:
        """Forget days older than the longest look-back, so state stays bounded (once a day).

        Exactly at the look-back, not lazily later: a report from a lagging topic can be older than
        ``today`` by days, and its baseline would otherwise see days that are gone in a fresh state.
        """
        if self.pruned_day == today:
            return
        self.pruned_day = today
        oldest = today - keep_days
        first = self.oldest_day
        if first is None and self.counts:
            first = self.oldest_day = min(self.counts)
        if first is not None and first < oldest:
            # Delete the days that fell out (usually one) rather than rebuild both dicts every day:
            # the kept days keep their order, so every sum over them is the same.
            counts, grams = self.counts, self.grams
            changed_counts, changed_grams = self.changed_counts, self.changed_grams
            for day in range(first, oldest):  # a day with grams always has a count (observe adds both)
                counts.pop(day, None)
                grams.pop(day, None)
                changed_counts.pop(day, None)
                changed_grams.pop(day, None)
            # Every day kept is >= oldest: the first of the next few days that has a count is the minimum. Most
            # series had a report on one of them; ``min`` over ~40 boxed days was ~3 % of the backtest's detection.
            self.oldest_day = None
            for day in range(oldest, oldest + 8):
                if day in counts:
                    self.oldest_day = day
                    break
            else:
                if counts:
                    self.oldest_day = min(counts)
            self.cut = oldest
        if len(self.evidence_ids) > EVIDENCE_KEPT:
            self.trim_evidence()

    def trim_evidence(self) -> None:
        """Keep the newest :data:`EVIDENCE_KEPT` evidence ids (and their days)."""
        del self.evidence_days[:-EVIDENCE_KEPT]
        del self.evidence_ids[:-EVIDENCE_KEPT]


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p); n is a week of seizures, so exact summation is cheap."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return _sum_floats(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _cap(mean: float, z: float) -> float:
    """Highest daily count a baseline day keeps: ``mean + z·sqrt(mean) + 1``."""
    return mean + z * math.sqrt(mean) + 1.0


def _factors(rhythm: Sequence[float]) -> list[float]:
    """The weekday factors as a list (the region stage's are one already): compiled, a list is indexed directly,
    any other sequence through a generic lookup (~1 M in a year's backtest)."""
    return rhythm if isinstance(rhythm, list) else list(rhythm)


def _values_until(days: list[int], values: list[float], cutoff: int) -> list[float]:
    """The masses of days up to ``cutoff``, in order. Indexed, not zipped: compiled, a strict ``zip`` built a
    tuple per mass (~60 a series), for every seizure tested."""
    if len(days) != len(values):
        raise ValueError(f"{len(days)} mass days but {len(values)} masses")
    return [values[i] for i in range(len(values)) if days[i] <= cutoff]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class _Thresholds:
    """The :class:`SpikeConfig` values the tests read, as attributes of a compiled class: compiled, an attribute of
    the (pydantic) config is a generic attribute lookup, and the tests of a year's backtest read ~1.3 M of them."""

    def __init__(self, cfg: SpikeConfig) -> None:
        self.baseline_days: int = cfg.baseline_days
        self.min_history_days: int = cfg.min_history_days
        self.min_baseline_days: int = cfg.min_baseline_days
        self.baseline_cap_z: float | None = cfg.baseline_cap_z
        self.prior_events: float = cfg.prior_events
        self.min_count: int = cfg.min_count
        self.min_ratio: float = cfg.min_ratio
        self.max_dispersion: float = cfg.max_dispersion
        self.dispersion_prior_days: float = cfg.dispersion_prior_days
        self.cooldown_days: int = cfg.cooldown_days
        self.renew_after_days: int = cfg.renew_after_days
        self.mass_min_history: int = cfg.mass_min_history
        self.mass_z: float = cfg.mass_z
        self.mass_top: int = cfg.mass_top
        self.mass_prior_weight: float = cfg.mass_prior_weight
        self.mass_extreme_z: float | None = cfg.mass_extreme_z
        self.mass_repeat: int = cfg.mass_repeat
        self.mass_alpha: float = cfg.mass_alpha
        self.mass_window_days: int = cfg.mass_window_days
        self.mass_memory: int = cfg.mass_memory


# Compiled, a class refuses interpreted subclasses unless it allows them: the tests check the lazy shortcuts
# against a subclass that learns everything eagerly.
@mypyc_attr(allow_interpreted_subclasses=True)
class SpikeModel:
    """Updates a series with one report and says whether it now shows a spike.

    ``config`` is read once, when it is built (as for ``keep_days``): a model with other thresholds is a new one.
    """

    def __init__(self, config: SpikeConfig | None = None) -> None:
        self.config = config or SpikeConfig()
        cfg = self.config
        self._cfg = _Thresholds(cfg)
        self.keep_days = cfg.baseline_days + cfg.guard_days + max(cfg.windows) + 2
        self._windows, self._longest = frozenset(cfg.windows), max(cfg.windows)
        # Whether a window ends ``length`` days back, by length: a list index where a frozenset needed a boxed lookup.
        self._is_window = [length in self._windows for length in range(self._longest + 1)]
        self._alpha_per_window = cfg.alpha / len(cfg.windows)
        self._baseline_lag = max(cfg.windows) + cfg.guard_days - 1  # day - lag: the baseline's exclusive end

    def observe(
        self,
        state: SeriesState,
        day: int,
        today: int,
        event_id: str,
        grams: float | None,
        rhythm: Sequence[float],
        test_mass: bool = True,
        pool: SeriesState | None = None,
        test: bool = True,
        rhythms: dict[int, list[float]] | None = None,
    ) -> list[SpikeFinding]:
        """Add a report of ``day`` and test the series; ``today`` is the day the series is pruned as of (the region's
        slowest kind's, see ``RegionDetector._settled_day``: a report of the kind read ahead may be newer).

        ``rhythm[day % 7]`` is the region's weekday factor (1.0 when unknown). ``test_mass`` is off for
        series whose masses are only kept as ``pool``: the usual seizure of a sparse series' family.
        ``test`` off only records the report (a state rebuild filling the days older findings no longer
        depend on: testing them would cost most of the rebuild and decide nothing). ``rhythms``: the region's
        factors by day (:meth:`RegionDetector.rhythm`), for the windows of a newer day than ``day``.
        """
        cached = state.cached_baseline
        if cached is not None and cached[1] is not None and cached[1][2] is None and day < cached[1][4]:
            # A report inside a cached baseline (a lagging topic): settle its dispersion on the counts
            # the rate was learnt from, as if it had been learnt with the rate.
            self._dispersion(state, cached[1])
        counts = state.counts
        counts[day] = counts.get(day, 0) + 1
        state.changed_counts[day] = None
        if state.oldest_day is not None and day < state.oldest_day:
            state.oldest_day = day
        newest = state.newest_day
        if newest is None:
            newest = state.newest_day = max(counts)
        elif day > newest:
            newest = state.newest_day = day
        state.evidence_days.append(day)
        state.evidence_ids.append(event_id)
        state.added_evidence += 1
        if len(state.evidence_ids) > 2 * EVIDENCE_KEPT:  # pruning trims them once a day; it may not run for days
            state.trim_evidence()
        findings = []
        # The windows ending on the report's day and, for a report behind the series' newest day, on that day.
        count_finding = self._count_test(state, day, rhythm, newest, rhythms) if test else None
        if count_finding is not None:
            findings.append(count_finding)
        if grams is not None and grams > 0:
            state.grams[day] = state.grams.get(day, 0.0) + grams
            state.changed_grams[day] = None
            if test_mass and test:
                mass_finding = self._mass_test(state, day, math.log(grams), pool)
                if mass_finding is not None:
                    findings.append(mass_finding)
            else:
                state.add_mass(day, math.log(grams), self._cfg.mass_memory)
        if state.pruned_day != today:
            cached = state.cached_baseline
            parts = cached[1] if cached is not None else None
            if parts is not None and parts[2] is None and parts[3] < today - self.keep_days:
                self._dispersion(state, parts)  # before pruning may drop the baseline's days
            state.prune(today, self.keep_days)
        return findings

    # --- counts --------------------------------------------------------------------------------------

    def _baseline_parts(self, state: SeriesState, day: int, rhythm: Sequence[float]) -> list[Any] | None:
        """The baseline of ``day``, cached for the day: [reports, exposure, dispersion or None, start, end,
        weekday factors it was learnt with].

        The dispersion is left out (None) when no day was capped: only a window that already passes the
        observed/expected ratio needs it (about a quarter of the baselines learnt), see :meth:`_dispersion`.
        """
        cached = state.cached_baseline
        if cached is not None and cached[0] == day:
            return cached[1]
        parts = self._baseline_rate(state, day, rhythm)
        state.cached_baseline = (day, parts)
        return parts

    def _baseline_rate(self, state: SeriesState, day: int, rhythm: Sequence[float]) -> list[Any] | None:
        cfg = self._cfg

        end = day - self._baseline_lag  # exclusive: window + guard band left out
        first_day = state.first_day
        start = end - cfg.baseline_days
        if start < first_day:
            start = first_day
        days = end - start
        if day - first_day < cfg.min_history_days or days < cfg.min_baseline_days:
            return None
        # Summing only the days with reports (most days of a sparse series are zero).
        factors = _factors(rhythm)
        weeks, rest = divmod(days, 7)
        partial = 0.0  # the same additions, in the same order, as ``sum()`` over the last ``rest`` days
        for d in range(end - rest, end):
            partial += factors[d % 7]
        total_factor = weeks * _sum_floats(rhythm) + partial
        total = highest = 0.0
        for d, count in state.counts.items():
            if start <= d < end:
                total += count
                adjusted = count / factors[d % 7]
                if adjusted > highest:
                    highest = adjusted
        # Robust: a day far above the rate (an earlier spike) is capped at rate + z·sqrt(rate) + 1
        # (weekday-adjusted) before the rate and dispersion are learnt, or it would hide the next spike.
        z = cfg.baseline_cap_z
        if z is not None and highest > _cap((total + cfg.prior_events) / total_factor, z):
            values = [(count / factors[d % 7], factors[d % 7]) for d, count in state.counts.items() if start <= d < end]
            cap = highest
            for _ in range(2):  # the rate falls as the outliers are capped; two passes converge
                cap = _cap((total + cfg.prior_events) / total_factor, z)
                total = 0.0  # as ``sum()`` (0.0 + x is x): the same additions in the same order, without a generator
                for adjusted, factor in values:
                    total += (cap if cap < adjusted else adjusted) * factor
            adjusted_sum = adjusted_squares = 0.0
            for adjusted, _ in values:
                kept = cap if cap < adjusted else adjusted
                adjusted_sum += kept
                adjusted_squares += kept * kept
            dispersion = self._dispersion_of(adjusted_sum, adjusted_squares, days)
            return [total + cfg.prior_events, total_factor, dispersion, start, end, rhythm]
        return [total + cfg.prior_events, total_factor, None, start, end, rhythm]

    def _dispersion(self, state: SeriesState, parts: list[Any]) -> float:
        """The baseline's dispersion, learnt on first use (the baseline's days no longer change today).

        With the weekday factors the rate was learnt with: the cached baseline must stay the one first learnt.
        """
        if parts[2] is None:
            # Typed: compiled, the sums below were generic object arithmetic on the list's Any items.
            start: int = parts[3]
            end: int = parts[4]
            factors = _factors(parts[5])
            adjusted_sum = adjusted_squares = 0.0
            for d, count in state.counts.items():  # the order of the sums is the counts' own, as always
                if start <= d < end:
                    adjusted = count / factors[d % 7]
                    adjusted_sum += adjusted
                    adjusted_squares += adjusted * adjusted
            parts[2] = self._dispersion_of(adjusted_sum, adjusted_squares, end - start)
        dispersion: float = parts[2]
        return dispersion

    def _dispersion_of(self, adjusted_sum: float, adjusted_squares: float, days: int) -> float:
        """Variance / mean of the weekday-adjusted daily counts, shrunk towards Poisson and capped."""
        cfg = self._cfg
        mean = adjusted_sum / days
        variance = (adjusted_squares - days * mean * mean) / (days - 1)
        # Variance / mean of a few weeks is noisy: shrunk towards Poisson (1) by ``dispersion_prior_days``.
        raw = variance / mean if mean > 0 else 1.0
        weight = (days - 1) / (days - 1 + cfg.dispersion_prior_days)
        return min(cfg.max_dispersion, max(1.0, 1.0 + weight * (raw - 1.0)))

    def _count_test(
        self,
        state: SeriesState,
        day: int,
        rhythm: Sequence[float],
        newest: int,
        rhythms: dict[int, list[float]] | None = None,
    ) -> SpikeFinding | None:
        """Test the windows ending on the report's day and, for a report behind the series' newest day (out of
        order, not late: a late one never reaches the series), on the newest day.

        Such a report must be able to complete the evidence of the newest windows, or whether a spike
        is ever tested with all its reports would depend on the order reports happen to arrive in.
        The episode is dated by the earliest window end that crosses. The newest day's windows are weighed
        with that day's weekday factors (``rhythms``), as a report of that day weighs them: with the report's
        own day's, their expected value depended on which report (of which kind and day) tested them. A state
        restored without the newest day's factors (saved before they were kept) falls back to the report's own.
        """
        found = self._count_windows(state, day, rhythm)
        if found is not None:
            return self._count_finding(state, day, *found)
        if newest > day:
            if rhythms is not None:
                rhythm = rhythms.get(newest, rhythm)
            found = self._count_windows(state, newest, rhythm)
            if found is not None:
                return self._count_finding(state, newest, *found)
        return None

    def _count_windows(
        self, state: SeriesState, day: int, rhythm: Sequence[float]
    ) -> tuple[float, int, int, float] | None:
        """(p, window, observed, expected) of the most surprising window ending on ``day``, if any."""
        cfg = self._cfg
        counts, is_window, min_count, min_ratio = state.counts, self._is_window, cfg.min_count, cfg.min_ratio
        factors = _factors(rhythm)
        baseline: list[Any] | None = None
        rate = events = exposure = 0.0
        dispersion: float | None = None
        best: tuple[float, int, int, float] | None = None
        observed, weight = 0, 0.0
        for length in range(1, self._longest + 1):  # one pass: every window's sums on the way
            d = day - length + 1
            observed += counts.get(d, 0)  # not a bound ``get``: compiled, that was a generic call per day
            weight += factors[d % 7]
            if observed < min_count or not is_window[length]:
                continue
            if baseline is None:  # learnt only when a window has enough reports (sparse series rarely do)
                baseline = self._baseline_parts(state, day, rhythm)
                if baseline is None:
                    return None
                events, exposure = baseline[0], baseline[1]
                rate = events / exposure
            expected = rate * weight
            if observed < min_ratio * expected:
                continue
            if dispersion is None:
                dispersion = self._dispersion(state, baseline)
            # The rate is known from ``events`` reports only: the predictive tail is negative binomial.
            p = gamma_poisson_sf(observed / dispersion, events / dispersion, weight / exposure)
            if p < self._alpha_per_window and (best is None or p < best[0]):
                best = (p, length, observed, expected)
        return best

    def _count_finding(
        self, state: SeriesState, day: int, p: float, window: int, observed: int, expected: float
    ) -> SpikeFinding:
        episode, new = self._episode(state, "count", day, day - window + 1)
        return SpikeFinding(
            metric="count",
            window_days=window,
            observed=observed,
            expected=round(expected, 4),
            score=round(min(-math.log10(max(p, 1e-300)), 300.0), 3),
            episode_start=episode.start_day,
            window_start_day=day - window + 1,
            window_end_day=day,
            new_episode=new,
        )

    # --- seized mass ---------------------------------------------------------------------------------

    def _mass_test(
        self, state: SeriesState, day: int, log_mass: float, pool: SeriesState | None
    ) -> SpikeFinding | None:
        """Are this window's seizures improbably large for this series?

        The usual log-mass is the series' own (median/MAD) or, while it has too few seizures, the
        region × family pool's (drugs of one family are seized in similar forms and sizes). For the
        k = 2..``mass_top`` largest seizures of the window, how likely are k seizures at least as large
        as the k-th among the window's seizures (binomial, Bonferroni over k)? The tail rate at that
        level is the history's, shrunk towards the normal tail by ``mass_prior_weight`` pseudo-seizures,
        so a short history neither hides nor invents a tail.
        """
        cfg = self._cfg
        cutoff = day - cfg.mass_window_days
        own = _values_until(state.mass_days, state.mass_values, cutoff)
        state.add_mass(day, log_mass, cfg.mass_memory)
        history = own
        if len(history) < cfg.mass_min_history and pool is not None:
            history = _values_until(pool.mass_days, pool.mass_values, cutoff)
        if len(history) < cfg.mass_min_history:
            return None
        centre = _median(history)
        if log_mass <= centre and cfg.mass_z > 0:
            return None  # at most the usual seizure: its robust z is not positive, whatever the spread
        spread = max(1.4826 * _median([abs(v - centre) for v in history]), 0.25)
        current = (log_mass - centre) / spread
        if current < cfg.mass_z:
            return None
        days, values = state.mass_days, state.mass_values
        recent = [(values[i] - centre) / spread for i in range(len(values)) if cutoff < days[i] <= day]
        recent.sort(reverse=True)
        scores = [(v - centre) / spread for v in history]
        tested = range(cfg.mass_repeat, min(cfg.mass_top, len(recent)) + 1)
        best = 1.0
        for k in tested:
            level = recent[k - 1]
            if current < level or level < cfg.mass_z:
                continue
            in_history = sum(1 for v in scores if v >= level)
            tail = (in_history + cfg.mass_prior_weight * normal_sf(level)) / (len(history) + cfg.mass_prior_weight)
            best = min(best, binomial_sf(k, len(recent), tail))
        p = min(1.0, best * max(1, len(tested)))
        extreme = cfg.mass_extreme_z is not None and current >= cfg.mass_extreme_z
        if not (extreme or p < cfg.mass_alpha):
            return None
        window_first = cutoff + 1
        observed = _sum_floats(state.grams.get(d, 0.0) for d in range(window_first, day + 1))
        history_days = max(1, cutoff - state.first_day)
        expected = math.exp(centre) * len(own) / history_days * cfg.mass_window_days  # median seizure x rate
        episode, new = self._episode(state, "quantity", day, window_first)
        return SpikeFinding(
            metric="quantity",
            window_days=cfg.mass_window_days,
            observed=round(observed, 3),
            expected=round(expected, 3),
            score=round(min(-math.log10(max(p, 1e-300)), 300.0), 3),
            episode_start=episode.start_day,
            window_start_day=window_first,
            window_end_day=day,
            new_episode=new,
            mass_z=round(current, 3),
        )

    # --- episodes ------------------------------------------------------------------------------------

    def _episode(self, state: SeriesState, metric: str, day: int, window_start: int) -> tuple[Episode, bool]:
        """The episode this evidence belongs to, and whether it starts now.

        An episode ends after ``cooldown_days`` without evidence. It also ends when the evidence lies
        wholly after the episode's first window (a second surge days after the first): the long windows
        still cross while they hold the first surge, and would otherwise swallow the second one.
        """
        current = state.episodes.get(metric)
        if (
            current is None
            or day - current.last_day > self._cfg.cooldown_days
            or window_start > current.start_day + self._cfg.renew_after_days
        ):
            current = Episode(start_day=day, last_day=day)
            state.episodes[metric] = current
            return current, True
        current.last_day = max(current.last_day, day)
        return current, False


def ears_c2(counts: list[int], threshold: float = 3.0, min_sd: float = 0.2) -> bool:
    """EARS C2 on a day: ``counts`` holds days t-9..t (10 values); baseline t-9..t-3 (2-day lag).

    Kept only as the reference the detection benchmark compares against.
    """
    baseline = counts[:7]
    mean = sum(baseline) / 7
    sd = math.sqrt(_sum_floats((c - mean) ** 2 for c in baseline) / 6)
    return (counts[-1] - mean) / max(sd, min_sd) > threshold
