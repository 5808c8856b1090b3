"""``synthwatch bench detection``: detection quality on labelled simulated streams, beside EARS C2.

For each seed: simulate a stream with a warm-up, run the worker's detector core over it in file order,
and score the alerts against the injected incidents. EARS C2 runs on the same daily counts per region
× substance, as the reference public-health systems use. Nothing here is a timed test.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date

from rich.console import Console
from rich.table import Table

from synthwatch.producers.simulate import Incident, SimulationConfig, simulate
from synthwatch.stream_apps.detect.alerting import day_of
from synthwatch.stream_apps.detect.identity import SubstanceResolver
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.region import DetectionConfig, Detector, Observation
from synthwatch.stream_apps.detect.spikes import ears_c2, poisson_sf

START = date(2026, 1, 1)


@dataclass
class SeedScore:
    seed: int
    new_total: int = 0
    new_same_day: int = 0
    new_false: int = 0  # a "never seen" claim about a substance reported before: wrong
    new_unlabelled: int = 0  # true first reports of substances the simulator did not inject
    first_total: int = 0
    first_same_day: int = 0
    first_false: int = 0
    first_unlabelled: int = 0
    spikes: list[tuple[float, int | None]] = field(default_factory=list)  # (factor, days to detection)
    detectable: list[bool] = field(default_factory=list)  # per spike: could an oracle tell it from noise?
    false_alarm_days: int = 0
    series_days: int = 0
    c2_false_alarm_days: int = 0
    c2_spikes: list[tuple[float, int | None]] = field(default_factory=list)
    events: int = 0
    alerts_after_warmup: int = 0
    false_by_kind: dict[str, int] = field(default_factory=dict)


def _incident_key(incident: Incident, resolver: SubstanceResolver) -> str:
    return resolver.resolve(incident.substance_name, smiles=incident.smiles, inchikey=incident.inchikey).key


def score_seed(seed: int, days: int, warmup: int, config: DetectionConfig | None = None) -> SeedScore:
    """Simulate, detect and score one seed."""
    sim = simulate(SimulationConfig(days=days, seed=seed, start=START, warmup_days=warmup))
    intake, detector = Intake(stage="backtest"), Detector(config)
    warm_day = day_of_date(START) + warmup
    score = SeedScore(seed)
    alerts = []
    first_day_of: dict[str, int] = {}  # substance -> first day in the data
    first_day_in: dict[tuple[str, str], int] = {}  # (region, substance) -> first day
    daily: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for i, line in enumerate(sim.lines):
        batch = intake.process([RawMessage(f"sim:{i}", line)])
        if not batch.events:
            continue
        obs = Observation.of(batch.events[0])
        result = detector.observe(obs)
        if result.duplicate:
            continue
        score.events += 1
        key, region = obs.subject.key, obs.region
        for alert in result.alerts:
            alerts.append((alert, obs.day))
            if alert.alert_type == "new_substance" and key in first_day_of:
                score.new_false += 1
            if alert.alert_type == "first_in_region" and (region, key) in first_day_in:
                score.first_false += 1
        first_day_of.setdefault(key, obs.day)
        first_day_in.setdefault((region, key), obs.day)
        daily[(region, key)][obs.day] += 1

    resolver = intake.resolver
    last_day = day_of_date(START) + days - 1
    after = [(a, d) for a, d in alerts if d >= warm_day]
    score.alerts_after_warmup = len(after)

    incidents_by_ids: dict[str, Incident] = {}
    for incident in sim.truth.incidents:
        for event_id in incident.event_ids:
            incidents_by_ids.setdefault(event_id, incident)

    # --- novelty ----------------------------------------------------------------------------------------
    for kind in ("new_substance", "first_in_region"):
        injected = [i for i in sim.truth.incidents if i.type == kind]
        caught = 0
        for incident in injected:
            start_day = day_of(incident.start)
            ids = set(incident.event_ids)
            if any(
                a.alert_type == kind and bool(ids & set(a.evidence_event_ids)) and d == start_day for a, d in alerts
            ):
                caught += 1
        unlabelled = sum(
            1 for a, _ in after if a.alert_type == kind and not any(e in incidents_by_ids for e in a.evidence_event_ids)
        )
        if kind == "new_substance":
            score.new_total, score.new_same_day, score.new_unlabelled = len(injected), caught, unlabelled
        else:
            score.first_total, score.first_same_day, score.first_unlabelled = len(injected), caught, unlabelled

    # --- spikes -------------------------------------------------------------------------------------------
    spike_incidents = []
    for incident in sim.truth.incidents:
        if incident.type != "spike":
            continue
        key = _incident_key(incident, resolver)
        first = day_of(incident.window_start or incident.start)
        end = day_of(incident.window_end or incident.end or incident.start)
        spike_incidents.append((incident, key, first, end))
    novelty_by_region = [(i.region, i.family, day_of(i.start)) for i in sim.truth.incidents if i.type != "spike"]

    def explained(region: str, series: str, day: int) -> bool:
        for incident, key, first, end in spike_incidents:
            family_series = f"family:{incident.family}"
            if incident.region == region and series in (key, family_series) and first - 1 <= day <= end + 7:
                return True
        return any(
            r == region and series == f"family:{family}" and start - 1 <= day <= start + 21
            for r, family, start in novelty_by_region
        )

    false_alarms = [
        a for a, d in after if a.alert_type == "spike" and not explained(a.region or "", a.substance.key, d)
    ]
    score.false_alarm_days = len({(a.region, a.substance.key, day_of(a.triggered_at)) for a in false_alarms})
    for a in false_alarms:
        kind = f"{'family' if a.substance.key.startswith('family:') else 'substance'}/{a.metric}"
        score.false_by_kind[kind] = score.false_by_kind.get(kind, 0) + 1
    for incident, key, first, end in spike_incidents:
        hits = [
            d
            for a, d in alerts
            if a.alert_type == "spike"
            and a.region == incident.region
            and a.substance.key == key
            and first <= d <= end + 2
        ]
        score.spikes.append((incident.factor or 0.0, (min(hits) - first) if hits else None))
        score.detectable.append(oracle_detectable(incident, daily[(incident.region, key)], first, end))

    # --- denominators and EARS C2 on the same daily counts -----------------------------------------------
    spike_windows = defaultdict(list)
    for incident, key, first, end in spike_incidents:
        spike_windows[(incident.region, key)].append((first, end, incident.factor or 0.0))
    c2_hits: dict[str, int | None] = {}
    for (region, key), counts in daily.items():
        first_seen = first_day_in[(region, key)]
        for day in range(max(warm_day, first_seen), last_day + 1):
            score.series_days += 1
            window = [counts.get(d, 0) for d in range(day - 9, day + 1)]
            if not ears_c2(window):
                continue
            matched = False
            for idx, (first, end, _) in enumerate(spike_windows.get((region, key), [])):
                if first <= day <= end + 2:
                    matched = True
                    tag = f"{region}|{key}|{idx}"
                    if c2_hits.get(tag) is None:
                        c2_hits[tag] = day - first
            if not matched:
                score.c2_false_alarm_days += 1
    for (region, key), windows in spike_windows.items():
        for idx, (_, _, factor) in enumerate(windows):
            score.c2_spikes.append((factor, c2_hits.get(f"{region}|{key}|{idx}")))
    return score


ORACLE_P = 0.01


def oracle_detectable(incident: Incident, counts: dict[int, int], first: int, end: int) -> bool:
    """Whether a detector that knew the series' true rate could tell this spike from noise.

    The simulator labels a count spike when its window holds 1.5× the reports of the window before
    plus three; with 2-4 reports a day, a ×2 spike often does not stand out from Poisson noise at all.
    Here the window's realised reports are tested against the true expectation without the spike
    (``baseline_per_day`` × days, which includes the simulated noise and drift): p ≥ ``ORACLE_P``
    means no detector at a false-alarm rate near 1 per 1000 days can see it. Mass spikes are
    always counted as detectable.
    """
    if incident.metric != "count" or not incident.baseline_per_day:
        return True
    days = end - first + 1  # UTC days: a local window of n days touches n + 1 of them
    observed = sum(counts.get(d, 0) for d in range(first, end + 1))
    return poisson_sf(observed, incident.baseline_per_day * days) < ORACLE_P


def day_of_date(value: date) -> int:
    return (value - date(1970, 1, 1)).days


def _rate(hits: list[tuple[float, int | None]], minimum: float = 0.0) -> tuple[int, int]:
    chosen = [ttd for factor, ttd in hits if factor >= minimum]
    return sum(1 for ttd in chosen if ttd is not None), len(chosen)


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.0f}% ({n}/{total})" if total else "n/a"


def bench_detection(
    console: Console, seeds: tuple[int, ...] = (1, 2, 3, 4, 5), days: int = 150, warmup: int = 60
) -> dict[str, float]:
    """Run every seed and print one table; returns the headline numbers."""
    scores = [score_seed(seed, days, warmup) for seed in seeds]
    total = SeedScore(seed=-1)
    for s in scores:
        for name in (
            "new_total",
            "new_same_day",
            "new_false",
            "new_unlabelled",
            "first_total",
            "first_same_day",
            "first_false",
            "first_unlabelled",
            "false_alarm_days",
            "series_days",
            "c2_false_alarm_days",
            "events",
            "alerts_after_warmup",
        ):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.spikes += s.spikes
        total.detectable += s.detectable
        total.c2_spikes += s.c2_spikes
    big_hit, big_n = _rate(total.spikes, 4.0)
    all_hit, all_n = _rate(total.spikes)
    c2_big_hit, c2_big_n = _rate(total.c2_spikes, 4.0)
    c2_all_hit, c2_all_n = _rate(total.c2_spikes)
    seen = [hit for hit, ok in zip(total.spikes, total.detectable, strict=True) if ok]
    seen_hit, seen_n = _rate(seen)
    ttd = [t for _, t in total.spikes if t is not None]
    c2_ttd = [t for _, t in total.c2_spikes if t is not None]
    per_1000 = 1000 * total.false_alarm_days / max(total.series_days, 1)
    c2_per_1000 = 1000 * total.c2_false_alarm_days / max(total.series_days, 1)

    table = Table(
        title=f"detection quality: seeds {list(seeds)}, {days} days each, {warmup}-day warm-up, "
        f"{total.events:,} reports, {total.series_days:,} region-substance-days scored"
    )
    table.add_column("measure")
    table.add_column("synthwatch", justify="right")
    table.add_column("EARS C2", justify="right")
    table.add_column("target", justify="right")
    table.add_row("new substances caught the same day", _pct(total.new_same_day, total.new_total), "-", "100%")
    table.add_row("  false 'never seen' claims", str(total.new_false), "-", "0")
    table.add_row("  true first reports not injected", str(total.new_unlabelled), "-", "")
    table.add_row("first appearances caught the same day", _pct(total.first_same_day, total.first_total), "-", "≥ 95%")
    table.add_row("  false 'first in region' claims", str(total.first_false), "-", "0")
    table.add_row("  true first appearances not injected", str(total.first_unlabelled), "-", "")
    table.add_row("spikes ×4 and more caught", _pct(big_hit, big_n), _pct(c2_big_hit, c2_big_n), "≥ 95%")
    table.add_row("all injected spikes caught", _pct(all_hit, all_n), _pct(c2_all_hit, c2_all_n), "≥ 85%")
    table.add_row("  of those an oracle could tell from noise", _pct(seen_hit, seen_n), "-", "")
    table.add_row(
        "median days to detection",
        f"{statistics.median(ttd):.1f}" if ttd else "n/a",
        f"{statistics.median(c2_ttd):.1f}" if c2_ttd else "n/a",
        "≤ 2",
    )
    table.add_row("false-alarm days / 1000 region-substance-days", f"{per_1000:.2f}", f"{c2_per_1000:.1f}", "≤ 1.5")
    console.print(table)
    missed = sorted(f for f, t in total.spikes if t is None)
    if missed:
        console.print(f"missed spikes (factor): {', '.join(f'×{f:.1f}' for f in missed)}")
    return {
        "new_recall": total.new_same_day / max(total.new_total, 1),
        "first_recall": total.first_same_day / max(total.first_total, 1),
        "spike_recall_x4": big_hit / max(big_n, 1),
        "spike_recall": all_hit / max(all_n, 1),
        "spike_recall_detectable": seen_hit / max(seen_n, 1),
        "median_ttd": statistics.median(ttd) if ttd else float("nan"),
        "false_alarms_per_1000": per_1000,
        "c2_false_alarms_per_1000": c2_per_1000,
    }
