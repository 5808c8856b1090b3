"""Spike detection on sparse daily series (region × substance, region × family).

Most series are zero on most days, so a z-score over a 7-day window (EARS C1/C2/C3) false-alarms
constantly. Instead, each series learns its own rate from its history and asks how surprising the
recent count is under a quasi-Poisson model (Farrington-style: a day-of-week adjusted rate, an
overdispersion factor, a guard band so an ongoing spike does not inflate its own baseline), over
several window lengths. It decides intra-day: the current day is compared with a *full* day's
expectation, so an alert fires on the report that makes the evidence cross the threshold.

Seized mass has its own test: a seizure is exceptional when its log-mass is far above the series'
robust (median/MAD) log-mass; an episode needs repeated exceptional seizures, or one extreme one.

Everything here is pure and synchronous; state is plain data so it can live in a Faust table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SpikeConfig(BaseModel):
    """Detector thresholds; defaults tuned with ``synthwatch bench detection`` (see docs/detection.md)."""

    model_config = ConfigDict(frozen=True)

    windows: tuple[int, ...] = Field(default=(1, 2, 3, 5, 7), description="Window lengths in days.")
    baseline_days: int = Field(default=56, description="History used for the rate, before the guard band.")
    guard_days: int = Field(default=2, description="Days before the longest window left out of the baseline.")
    min_history_days: int = Field(default=21, description="A series younger than this is not tested.")
    min_baseline_days: int = Field(default=14, description="Fewest baseline days needed.")
    alpha: float = Field(default=1e-3, description="Tail probability that counts as a spike (all windows).")
    min_count: int = Field(default=3, description="Fewest reports in the window for a count spike.")
    min_ratio: float = Field(default=2.0, description="Observed / expected at least this.")
    max_dispersion: float = Field(default=4.0, description="Cap on the overdispersion factor.")
    cooldown_days: int = Field(default=7, description="Quiet days that end an episode.")
    mass_min_history: int = Field(default=8, description="Seizures with a mass needed for the mass test.")
    mass_z: float = Field(default=2.5, description="Robust z (log-mass) of a large seizure.")
    mass_extreme_z: float = Field(default=4.5, description="Robust z that alone makes a mass spike.")
    mass_repeat: int = Field(default=2, description="Fewest large seizures in the window for a mass spike.")
    mass_alpha: float = Field(default=1e-2, description="Binomial tail probability of that many large seizures.")
    mass_window_days: int = Field(default=7)
    mass_memory: int = Field(default=60, description="Most recent seizure masses kept per series.")


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


@dataclass(slots=True)
class SeriesState:
    """History of one daily series; small enough to be one Faust table value."""

    first_day: int
    counts: dict[int, int] = field(default_factory=dict)
    grams: dict[int, float] = field(default_factory=dict)
    masses: list[tuple[int, float]] = field(default_factory=list)  # (day, log grams), most recent last
    episodes: dict[str, Episode] = field(default_factory=dict)
    evidence: list[tuple[int, str]] = field(default_factory=list)  # (day, event_id), most recent last
    # Not persisted: the baseline of the current day (it ends two weeks back, so reports arriving today
    # - never more than the lateness old - cannot change it) and the last day pruned.
    cached_baseline: tuple[int, tuple[float, float, int] | None] | None = None
    pruned_day: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "f": self.first_day,
            "c": [[d, n] for d, n in self.counts.items()],
            "g": [[d, g] for d, g in self.grams.items()],
            "m": [[d, v] for d, v in self.masses],
            "e": {k: [v.start_day, v.last_day] for k, v in self.episodes.items()},
            "v": [[d, i] for d, i in self.evidence],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesState:
        return cls(
            first_day=int(data["f"]),
            counts={int(d): int(n) for d, n in data.get("c", [])},
            grams={int(d): float(g) for d, g in data.get("g", [])},
            masses=[(int(d), float(v)) for d, v in data.get("m", [])],
            episodes={k: Episode(int(v[0]), int(v[1])) for k, v in data.get("e", {}).items()},
            evidence=[(int(d), str(i)) for d, i in data.get("v", [])],
        )

    def prune(self, today: int, keep_days: int) -> None:
        """Forget days older than the longest look-back, so state stays bounded (once a day)."""
        if self.pruned_day == today:
            return
        self.pruned_day = today
        oldest = today - keep_days
        if self.counts and min(self.counts) < oldest:
            self.counts = {d: n for d, n in self.counts.items() if d >= oldest}
            self.grams = {d: g for d, g in self.grams.items() if d >= oldest}
        if len(self.evidence) > 64:
            self.evidence = self.evidence[-64:]


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p); n is a week of seizures, so exact summation is cheap."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class SpikeModel:
    """Updates a series with one report and says whether it now shows a spike."""

    def __init__(self, config: SpikeConfig | None = None) -> None:
        self.config = config or SpikeConfig()
        cfg = self.config
        self.keep_days = cfg.baseline_days + cfg.guard_days + max(cfg.windows) + 2

    def observe(
        self,
        state: SeriesState,
        day: int,
        today: int,
        event_id: str,
        grams: float | None,
        rhythm: Sequence[float],
    ) -> list[SpikeFinding]:
        """Add a report of ``day`` (≤ ``today``, the series' newest day) and test the series.

        ``rhythm[day % 7]`` is the region's weekday factor (1.0 when unknown).
        """
        state.counts[day] = state.counts.get(day, 0) + 1
        state.evidence.append((day, event_id))
        findings = []
        count_finding = self._count_test(state, day, rhythm)
        if count_finding is not None:
            findings.append(count_finding)
        if grams is not None and grams > 0:
            state.grams[day] = state.grams.get(day, 0.0) + grams
            mass_finding = self._mass_test(state, day, math.log(grams))
            if mass_finding is not None:
                findings.append(mass_finding)
        state.prune(today, self.keep_days)
        return findings

    # --- counts --------------------------------------------------------------------------------------

    def baseline_rate(self, state: SeriesState, day: int, rhythm: Sequence[float]) -> tuple[float, float, int] | None:
        """(weekday-adjusted daily rate, dispersion, baseline days) learnt from this series' history."""
        if state.cached_baseline is not None and state.cached_baseline[0] == day:
            return state.cached_baseline[1]
        baseline = self._baseline_rate(state, day, rhythm)
        state.cached_baseline = (day, baseline)
        return baseline

    def _baseline_rate(self, state: SeriesState, day: int, rhythm: Sequence[float]) -> tuple[float, float, int] | None:
        cfg = self.config

        end = day - max(cfg.windows) - cfg.guard_days + 1  # exclusive: window + guard band left out
        start = max(state.first_day, end - cfg.baseline_days)
        days = end - start
        if day - state.first_day < cfg.min_history_days or days < cfg.min_baseline_days:
            return None
        # One pass, summing only the days with reports (most days of a sparse series are zero).
        total_factor = sum(rhythm[d % 7] for d in range(start, end))
        total = 0
        adjusted_sum = adjusted_squares = 0.0
        for d, count in state.counts.items():
            if start <= d < end:
                total += count
                adjusted = count / rhythm[d % 7]
                adjusted_sum += adjusted
                adjusted_squares += adjusted * adjusted
        rate = max(total, 0.5) / total_factor  # half an event when none: a rate, never zero
        mean = adjusted_sum / days
        variance = (adjusted_squares - days * mean * mean) / (days - 1)
        dispersion = min(cfg.max_dispersion, max(1.0, variance / mean)) if mean > 0 else 1.0
        return rate, dispersion, days

    def _count_test(self, state: SeriesState, day: int, rhythm: Sequence[float]) -> SpikeFinding | None:
        """Test the windows ending on the report's day and, for a late report, on the series' newest day.

        A late report must be able to complete the evidence of the newest windows, or whether a spike
        is ever tested with all its reports would depend on the order reports happen to arrive in.
        The episode is dated by the earliest window end that crosses.
        """
        newest = max(state.counts)
        for end in (day, newest) if newest > day else (day,):
            found = self._count_windows(state, end, rhythm)
            if found is not None:
                return self._count_finding(state, end, *found)
        return None

    def _count_windows(
        self, state: SeriesState, day: int, rhythm: Sequence[float]
    ) -> tuple[float, int, int, float] | None:
        """(p, window, observed, expected) of the most surprising window ending on ``day``, if any."""
        cfg = self.config
        baseline = self.baseline_rate(state, day, rhythm)
        if baseline is None:
            return None
        rate, dispersion, _ = baseline
        best: tuple[float, int, int, float] | None = None
        counts, windows = state.counts, set(cfg.windows)
        observed, weight = 0, 0.0
        for length in range(1, max(cfg.windows) + 1):  # one pass: every window's sums on the way
            d = day - length + 1
            observed += counts.get(d, 0)
            weight += rhythm[d % 7]
            if length not in windows:
                continue
            window, expected = length, rate * weight
            if observed < cfg.min_count or observed < cfg.min_ratio * expected:
                continue
            p = poisson_sf(observed / dispersion, expected / dispersion)
            if p < cfg.alpha / len(cfg.windows) and (best is None or p < best[0]):
                best = (p, window, observed, expected)
        return best

    def _count_finding(
        self, state: SeriesState, day: int, p: float, window: int, observed: int, expected: float
    ) -> SpikeFinding:
        episode, new = self._episode(state, "count", day)
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

    def _mass_test(self, state: SeriesState, day: int, log_mass: float) -> SpikeFinding | None:
        cfg = self.config
        history = [v for d, v in state.masses if d < day - cfg.mass_window_days]
        state.masses.append((day, log_mass))
        if len(state.masses) > cfg.mass_memory:
            state.masses = state.masses[-cfg.mass_memory :]
        if len(history) < cfg.mass_min_history:
            return None
        centre = _median(history)
        spread = max(1.4826 * _median([abs(v - centre) for v in history]), 0.25)

        def z(value: float) -> float:
            return (value - centre) / spread

        current = z(log_mass)
        if current < cfg.mass_z:
            return None
        # How many of the window's seizures are unusually large, against this series' own tail rate
        # (the empirical one, or the normal one when the history is short: whichever is larger).
        recent = [v for d, v in state.masses if day - cfg.mass_window_days < d <= day]
        large = sum(1 for v in recent if z(v) >= cfg.mass_z)
        tail = max(normal_sf(cfg.mass_z), (sum(1 for v in history if z(v) >= cfg.mass_z) + 1) / (len(history) + 2))
        p = binomial_sf(large, len(recent), tail)
        if not (current >= cfg.mass_extreme_z or (large >= cfg.mass_repeat and p < cfg.mass_alpha)):
            return None
        window_first = day - cfg.mass_window_days + 1
        observed = sum(state.grams.get(d, 0.0) for d in range(window_first, day + 1))
        typical = math.exp(centre)  # median seizure
        seizures_in_history = len(history)
        history_days = max(1, day - cfg.mass_window_days - state.first_day)
        expected = typical * seizures_in_history / history_days * cfg.mass_window_days
        episode, new = self._episode(state, "quantity", day)
        return SpikeFinding(
            metric="quantity",
            window_days=cfg.mass_window_days,
            observed=round(observed, 3),
            expected=round(expected, 3),
            score=round(max(current, min(-math.log10(max(p, 1e-300)), 300.0)), 3),
            episode_start=episode.start_day,
            window_start_day=window_first,
            window_end_day=day,
            new_episode=new,
        )

    # --- episodes ------------------------------------------------------------------------------------

    def _episode(self, state: SeriesState, metric: str, day: int) -> tuple[Episode, bool]:
        """The episode this evidence belongs to, and whether it starts now (after a quiet cool-down)."""
        current = state.episodes.get(metric)
        if current is None or day - current.last_day > self.config.cooldown_days:
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
    sd = math.sqrt(sum((c - mean) ** 2 for c in baseline) / 6)
    return (counts[-1] - mean) / max(sd, min_sd) > threshold
