"""A spread alert says "reported in N regions within 14 days (A, B, C)": each region it names must have a report
in that window, and a late report (labs report days to weeks after sampling) that completes such a window must
raise it. The test counted each region's span [first day, last day] as active on every day between, so a late
report made a spread of regions silent in its window, and it tested only the window ending on the late report's own
day, so a late report completing a window of later reports raised nothing, however long it waited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import permutations

from hypothesis import given, settings
from hypothesis import strategies as st

from synthwatch.schemas import Alert
from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.alerting import day_of, day_start
from synthwatch.stream_apps.detect.config import NoveltyConfig
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from tests.support.factories import sighting

D0 = day_of(datetime(2026, 9, 1, tzinfo=UTC))
WIDTH, NEEDED = 14, 3


def _seen(region: str, day: int) -> Sighting:
    at = day_start(D0 + day) + timedelta(hours=10)
    return sighting(event_id=f"{region}-{day}", region=region, country=region[:2], day=D0 + day, occurred_at=at)


def _spreads(order: list[tuple[str, int]]) -> list[Alert]:
    detector = NoveltyDetector(NoveltyConfig(spread_regions=NEEDED, spread_days=WIDTH))
    return [a for region, day in order for a in detector.observe(_seen(region, day)) if a.alert_type == "spread"]


def _window(alert: Alert) -> tuple[int, int]:
    return day_of(alert.window_start) - D0, day_of(alert.window_end) - 1 - D0


def test_a_late_report_does_not_make_a_spread_of_regions_silent_in_its_window() -> None:
    # AA and DD reported on days 0-1 and again on day 40; CC's report of day 20 arrives last. No 14 days hold
    # reports of three regions: the span test counted AA and DD on day 20 (their spans run from day 0-1 to 40).
    assert _spreads([("AA-1", 0), ("DD-1", 1), ("AA-1", 40), ("DD-1", 40), ("CC-1", 20)]) == []


def test_a_late_report_that_completes_a_later_window_raises_the_spread() -> None:
    # AA on day 10, BB on day 12, then CC's report of day 5: days -1 to 12 hold all three. In day order the spread
    # is raised on BB's report; read late, CC's report was tested on days -8 to 5 only, and nothing was raised.
    in_order = _spreads([("CC-1", 5), ("AA-1", 10), ("BB-1", 12)])
    late = _spreads([("AA-1", 10), ("BB-1", 12), ("CC-1", 5)])
    assert [(_window(a), a.details["regions"]) for a in late] == [((-1, 12), ["AA-1", "BB-1", "CC-1"])]
    assert [a.alert_id for a in late] == [a.alert_id for a in in_order]  # the same alert: same window, same id
    assert late[0].evidence_event_ids == ["CC-1-5"]  # what completed it, read last


def test_the_windows_after_a_late_report_extend_the_episode_as_in_order() -> None:
    # A spread held from day 10 to 21; BB's late report of day 22 makes days 22-24 hold too, so the reports of day
    # 37 (within 14 days of 24) continue the episode, as they do in day order. Tested on day 22 alone (the span
    # test), the episode's last day was 22, and day 37 opened a second one.
    days = [("AA-1", 10), ("BB-1", 10), ("CC-1", 10), ("AA-1", 20), ("CC-1", 21), ("AA-1", 24)]
    in_order = _spreads([*days[:5], ("BB-1", 22), days[5], ("DD-1", 37), ("EE-1", 37), ("AA-1", 37)])
    late = _spreads([*days, ("BB-1", 22), ("DD-1", 37), ("EE-1", 37), ("AA-1", 37)])
    assert [_window(a) for a in late] == [_window(a) for a in in_order] == [(-3, 10)]


def _truth(reports: set[tuple[str, int]]) -> set[int]:
    """The days on which the last 14 days hold reports of three regions or more, from all the reports."""
    last = max(day for _, day in reports)
    return {x for x in range(last + 1) if len({region for region, day in reports if x - WIDTH < day <= x}) >= NEEDED}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.sets(st.tuples(st.sampled_from(["AA-1", "BB-1", "CC-1", "DD-1", "EE-1"]), st.integers(0, 14)), max_size=9),
    st.randoms(use_true_random=False),
)
def test_in_any_arrival_order_each_spread_names_regions_reported_in_its_window(
    reports: set[tuple[str, int]], rng: object
) -> None:
    order = sorted(reports)
    rng.shuffle(order)  # type: ignore[attr-defined]
    alerts = _spreads(order)
    truth = _truth(reports) if reports else set()
    # Raised if and only if some window holds three regions, whatever the order (days 0-14: one episode at most).
    assert len(alerts) == (1 if truth else 0)
    for alert in alerts:
        start, end = _window(alert)
        assert end - start == WIDTH - 1 and end in truth
        region, day = alert.evidence_event_ids[0].rsplit("-", 1)
        received = order[: order.index((region, int(day))) + 1]
        reported = sorted({region for region, day in received if start <= day <= end})
        assert alert.details["regions"] == reported  # each region named has a report in the window read so far
        assert alert.observed == len(reported) >= NEEDED


def test_in_day_order_the_spread_is_raised_on_the_first_day_it_holds() -> None:
    reports = [("AA-1", 0), ("BB-1", 3), ("AA-1", 9), ("CC-1", 15), ("DD-1", 16)]
    for order in permutations(reports[:3]):  # the three of days 0-9 in any order: no window of three yet
        assert _spreads(list(order)) == []
    assert [_window(a) for a in _spreads(reports)] == [(2, 15)]


def test_the_episode_of_a_late_report_ends_on_a_report_day_as_in_order() -> None:
    # AA, BB and CC on days 0-2 make a spread; EE's report of day 16 is read before CC's. Day order ends the episode
    # on day 2 (the last report whose window held), and GG, HH and EE make a new one on day 21 (19 days later). Read
    # late, CC's report was tested on days 2-15 and ended the episode on day 13, a day without reports whose window
    # still held AA, BB and CC: day 21 was 8 days after it, and the second spread was never raised.
    later = [("GG-1", 20), ("HH-1", 21), ("II-1", 22)]
    in_order = _spreads([("AA-1", 0), ("BB-1", 1), ("CC-1", 2), ("EE-1", 16), *later])
    late = _spreads([("AA-1", 0), ("BB-1", 1), ("EE-1", 16), ("CC-1", 2), *later])
    assert [a.alert_id for a in late] == [a.alert_id for a in in_order]
    assert [_window(a) for a in late] == [(-11, 2), (8, 21)]


def test_a_report_read_weeks_late_counts_for_its_own_region() -> None:
    # AA's report of day 10 arrives after AA's of day 50: its day bit (40 days back, past the 31 kept) is not kept,
    # and the windows holding day 10 did not count AA at all, though the report tested is AA's own.
    in_order = _spreads([("AA-1", 10), ("BB-1", 12), ("CC-1", 15), ("AA-1", 50)])
    late = _spreads([("BB-1", 12), ("CC-1", 15), ("AA-1", 50), ("AA-1", 10)])
    assert [a.alert_id for a in late] == [a.alert_id for a in in_order]
    assert [(_window(a), a.details["regions"]) for a in late] == [((2, 15), ["AA-1", "BB-1", "CC-1"])]


def test_a_region_first_report_counts_however_far_its_bits_reach() -> None:
    # AA reported on days 10 and 50 (its bits reach back to day 20); CC's report of day 15 is read after them: days
    # 2-15 hold AA (its first report, kept as the span's first day), BB and CC, as in day order.
    in_order = _spreads([("AA-1", 10), ("BB-1", 12), ("CC-1", 15), ("AA-1", 50)])
    late = _spreads([("AA-1", 10), ("AA-1", 50), ("BB-1", 12), ("CC-1", 15)])
    assert [a.alert_id for a in late] == [a.alert_id for a in in_order]
    assert [(_window(a), a.details["regions"]) for a in late] == [((2, 15), ["AA-1", "BB-1", "CC-1"])]


def _received_in(order: list[tuple[str, int]], alert: Alert) -> list[str]:
    region, day = alert.evidence_event_ids[0].rsplit("-", 1)
    start, end = _window(alert)
    received = order[: order.index((region, int(day))) + 1]
    return sorted({region for region, day in received if start <= day <= end})


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.sets(st.tuples(st.sampled_from(["AA-1", "BB-1", "CC-1", "DD-1", "EE-1"]), st.integers(0, 70)), max_size=12),
    st.randoms(use_true_random=False),
)
def test_over_ten_weeks_each_spread_names_only_regions_reported_in_its_window(
    reports: set[tuple[str, int]], rng: object
) -> None:
    # Past the days the bits reach a region may be left out (docs/detection.md, "Spread, late"), never one added.
    order = sorted(reports)
    rng.shuffle(order)  # type: ignore[attr-defined]
    for alert in _spreads(order):
        start, end = _window(alert)
        assert end - start == WIDTH - 1
        assert set(alert.details["regions"]) <= set(_received_in(order, alert))
        assert alert.observed == len(alert.details["regions"]) >= NEEDED


def test_a_late_report_completing_an_episode_long_before_the_known_one_raises_it() -> None:
    # DD, EE and FF make a spread on day 100; CC's report of day 2, read after them, completes days -11 to 2 with AA
    # and BB: an episode 98 days before, raised in day order. It was taken for the episode of day 100 (a negative
    # gap), and never raised.
    early, known = [("AA-1", 0), ("BB-1", 1)], [("DD-1", 100), ("EE-1", 100), ("FF-1", 100)]
    in_order = _spreads([*early, ("CC-1", 2), *known])
    late = _spreads([*early, *known, ("CC-1", 2)])
    assert sorted(a.alert_id for a in late) == sorted(a.alert_id for a in in_order)
    assert [(_window(a), a.details["regions"]) for a in late][-1] == ((-11, 2), ["AA-1", "BB-1", "CC-1"])
    # The episode of day 100 is still the one a later report continues.
    assert _spreads([*early, *known, ("CC-1", 2), ("GG-1", 110)])[2:] == []


def test_a_late_report_in_an_episode_alerted_before_the_known_one_raises_nothing() -> None:
    # Days 0-2 were alerted, then day 100; reports of days 5 and 20 read late hold windows of the first episode (or
    # continue it): no second alert of it, whichever day its windows start.
    first, known = [("AA-1", 0), ("BB-1", 1), ("CC-1", 2)], [("DD-1", 100), ("EE-1", 100), ("FF-1", 100)]
    assert len(_spreads([*first, *known])) == 2
    assert len(_spreads([*first, *known, ("GG-1", 5)])) == 2
    assert len(_spreads([*first, *known, ("GG-1", 5), ("HH-1", 12), ("II-1", 20)])) == 2
    # AA and BB again on days 10 and 12: the window of day 12 held before GG's report of day 12 was read.
    assert len(_spreads([*first, ("AA-1", 10), ("CC-1", 12), *known, ("GG-1", 12)])) == 2
