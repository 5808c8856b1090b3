"""The worker reads lab detections and border seizures from two topics, each in its own order, interleaved
arbitrarily from run to run; the backtest reads them in file order. The same reports must raise the same
alerts however the two kinds interleave (docs/detection.md, "What late means").

`make demo` raised 22 spike alerts in one run of 15 instead of 21, and dated one spike differently. Reproduced
without a broker by feeding the demo's live lines to detectors rebuilt from its history in two interleavings (see
the report of branch order20): two mechanisms, one test each below.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthwatch.stream_apps.detect.alerting import Subject, day_of
from synthwatch.stream_apps.detect.region import Detector, Observation

T0 = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
METHADONE = Subject("USSIQXCVUWKGNF", "Methadone", None, None, True, True)
HISTORY_DAYS = 80


def _report(kind: str, day: int, hour: float, n: int) -> Observation:
    at = T0 + timedelta(days=day, hours=hour)
    if kind == "lab_detection":
        return Observation(f"L{n}", kind, at, day_of(at), "MA", "MA-TNG", METHADONE, None, "GC-MS", "powder", "LAB-1")
    return Observation(f"S{n}", kind, at, day_of(at), "MA", "MA-TNG", METHADONE, None, None, None, "customs")


def _history() -> list[Observation]:
    """80 days of one report a day, labs and seizures on alternate days, plus a lab on Tuesdays and a seizure on
    Fridays (a weekday rhythm to learn), both kinds in step."""
    reports = []
    for day in range(HISTORY_DAYS):
        kinds = ["lab_detection" if day % 2 else "border_seizure"]
        kinds += ["lab_detection"] * (day % 7 == 1) + ["border_seizure"] * (day % 7 == 4)
        for k, kind in enumerate(kinds):
            reports.append(_report(kind, day, 9 + k, len(reports)))
    return reports


def _spikes(detector: Detector, reports: list[Observation]) -> list[dict[str, Any]]:
    found = []
    for report in reports:
        found += [a for a in detector.observe(report).alerts if a.alert_type == "spike"]
    return [a.model_dump(exclude={"detected_at"}) for a in found]  # detected_at is the wall clock


def _run(live: list[Observation], history: list[Observation] | None = None) -> list[dict[str, Any]]:
    detector = Detector()
    _spikes(detector, _history() if history is None else history)
    return _spikes(detector, live)


def _merged(labs: list[Observation], seizures: list[Observation]) -> list[Observation]:
    return sorted(labs + seizures, key=lambda r: r.occurred_at)


def test_a_kind_read_days_behind_the_other_tests_against_its_whole_baseline() -> None:
    # A seizure surge on day 80, read after the lab topic reached day 86. The region's state used to be pruned as of
    # the newest kind's day, so the surge's baseline had lost its first days (still counted as exposure): a lower
    # rate, another expected value, and on the demo's data one spike more (NG-LA codeine, 2026-11-16).
    labs = [_report("lab_detection", day, 9, 1000 + day) for day in range(HISTORY_DAYS, HISTORY_DAYS + 7)]
    seizures = [_report("border_seizure", HISTORY_DAYS, 12 + k / 10, 2000 + k) for k in range(9)]
    in_step = _run(_merged(labs, seizures))
    assert [a["window_end"] for a in in_step] == [T0 + timedelta(days=HISTORY_DAYS + 1)]  # the surge is a spike
    assert _run(labs + seizures) == in_step


def _labs_only_history() -> list[Observation]:
    """80 days of labs only (one a day, two more a week): the region's seizures have no watermark yet."""
    reports = []
    for day in range(HISTORY_DAYS):
        for k in range(1 + (day % 7 == 1) + (day % 7 == 4)):
            reports.append(_report("lab_detection", day, 9 + k, len(reports)))
    return reports


@pytest.mark.parametrize("lead", [7, 10])
def test_a_kinds_first_report_read_days_behind_the_other_tests_against_its_whole_baseline(lead: int) -> None:
    # A kind with no watermark in the region yet (its first report there, or its watermark healed away, or a state
    # rebuilt from a window it was silent in) held pruning back by nothing: the labs read `lead` days ahead pruned
    # the series as of their day, and the first seizures (day 80) lost the first days of their baseline. Measured:
    # expected 1.0069 in step, 0.9514 (lead 7) and 0.8958 with one report fewer in the window (lead 10).
    labs = [_report("lab_detection", day, 9, 1000 + day) for day in range(HISTORY_DAYS, HISTORY_DAYS + lead)]
    seizures = [_report("border_seizure", HISTORY_DAYS, 12 + k / 10, 2000 + k) for k in range(9)]
    in_step = _run(_merged(labs, seizures), _labs_only_history())
    assert [(a["window_end"], a["expected"]) for a in in_step] == [(T0 + timedelta(days=HISTORY_DAYS + 1), 1.0069)]
    assert _run(labs + seizures, _labs_only_history()) == in_step


def test_a_series_evidence_stays_bounded_while_one_kind_pauses() -> None:
    # The evidence list is trimmed to 64 by pruning, which ran once a day as of the newest kind's day; pruned as of
    # the slowest kind's day, it does not run while that kind pauses (up to KIND_SKEW_DAYS): seizures paused for 10
    # days under 30 labs a day left 365 ids in the series (and its changelog record), 93 before pruning followed the
    # slowest kind; now at most 128 (trimmed to 64 past it between prunings; 105 at the end of this stream).
    detector = Detector()
    _spikes(detector, _history())
    labs = [_report("lab_detection", day, k / 2, 10_000 + 30 * day + k) for day in range(80, 90) for k in range(30)]
    _spikes(detector, labs)
    state = detector.regions.series["MA-TNG|USSIQXCVUWKGNF"]
    assert len(state.evidence_ids) == len(state.evidence_days) <= 128
    assert state.evidence_ids[-1] == labs[-1].event_id


# Mechanism 2, not fixed: a report of a kind read behind the other tests the windows of the series' newest day
# (`SpikeModel._count_test`), so which report makes a window cross depends on the interleaving; the alert takes that
# report's event time (triggered_at), its reporter and the evidence read so far (the demo: MA-TNG methadone raised
# at 2026-12-01 14:20 when the 12-02 seizures were read before that 12-01 lab, at 2026-12-02 13:36 when fewer of
# them were). It also took the weekday factors of that report's day (4.7 expected against 4.6): fixed, last test.
_CROSSING_REASON = (
    "which report crosses a spike's threshold, and so the alert's triggered_at, reported_by and evidence (and, when "
    "another day's window crosses first, the window, its counts, score and episode day), depends on how the two "
    "topics interleave: the newest day's windows are tested by reports of a kind read behind the other. Not fixed: "
    "docs/detection.md, Late reports"
)


def _surge() -> tuple[list[Observation], list[Observation]]:
    """Labs of day 80, seizures of day 81: neither day crosses alone, the two days together do."""
    labs = [_report("lab_detection", HISTORY_DAYS, 8 + 2 * k, 3000 + k) for k in range(6)]
    seizures = [_report("border_seizure", HISTORY_DAYS + 1, 6 + 2 * k, 4000 + k) for k in range(6)]
    return labs, seizures


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=_CROSSING_REASON)
def test_the_report_that_crosses_does_not_depend_on_the_interleaving() -> None:
    labs, seizures = _surge()
    in_step = _run(_merged(labs, seizures))
    assert in_step  # the surge is a spike
    assert _run(seizures + labs) == in_step  # the seizures of day 81 read before the labs of day 80


def _interleaved(labs: list[Observation], seizures: list[Observation], picks: list[bool]) -> list[Observation]:
    order, left, right = [], list(labs), list(seizures)
    for pick in picks:
        source = left if (pick and left) or not right else right
        if source:
            order.append(source.pop(0))
    return order + left + right


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=_CROSSING_REASON)
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.booleans(), min_size=12, max_size=12))
def test_any_interleaving_of_two_in_order_kinds_raises_the_same_alerts(picks: list[bool]) -> None:
    labs, seizures = _surge()
    assert _run(_interleaved(labs, seizures, picks)) == _run(_merged(labs, seizures))


_CROSSING = {"triggered_at", "reported_by", "evidence_event_ids"}


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.booleans(), min_size=12, max_size=12))
def test_any_interleaving_changes_only_what_the_crossing_report_says(picks: list[bool]) -> None:
    # What the xfails above hold, and no more: every interleaving of the surge (all 924 measured) raises the one
    # alert, the same but for the crossing report's time, reporter and evidence read so far. With the weekday
    # factors of day 80 instead of 81 (the history's extra labs of day 71 make them differ), a lab read after the
    # seizures said 3.1458 expected instead of 3.02.
    extra = [_report("lab_detection", 71, 20 + k / 10, 5000 + k) for k in range(3)]
    history = sorted(_history() + extra, key=lambda r: r.occurred_at)
    labs, seizures = _surge()
    got, in_step = _run(_interleaved(labs, seizures, picks), history), _run(_merged(labs, seizures), history)
    assert len(got) == len(in_step) == 1
    assert [{k: v for k, v in a.items() if k not in _CROSSING} for a in got] == [
        {k: v for k, v in a.items() if k not in _CROSSING} for a in in_step
    ]


def test_the_newest_days_windows_are_weighed_with_that_days_weekday_factors() -> None:
    # Three extra labs on day 71 make the weekday factors learnt for day 81 (from totals up to day 71) differ from
    # day 80's. A lab of day 80 read after the seizures of day 81 tests day 81's windows: it weighed them with day
    # 80's factors (the demo: MA-TNG methadone 4.7 expected at a lab of 12-01, 4.6 at a seizure of 12-02, one window).
    extra = [_report("lab_detection", 71, 20 + k / 10, 5000 + k) for k in range(3)]
    history = sorted(_history() + extra, key=lambda r: r.occurred_at)
    labs, seizures = _surge()
    in_step, lagging = _run(_merged(labs, seizures), history), _run(seizures + labs, history)
    assert [a["alert_id"] for a in lagging] == [a["alert_id"] for a in in_step] != []
    window = ("window_start", "window_end", "observed", "expected", "score")
    assert [{k: a[k] for k in window} for a in lagging] == [{k: a[k] for k in window} for a in in_step]
