"""Detectors on hand-made series: each test builds the reports it is about."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthwatch.stream_apps.detect.alerting import Subject, alert_id, day_of
from synthwatch.stream_apps.detect.novelty import NoveltyConfig, SubstanceState
from synthwatch.stream_apps.detect.region import DetectionConfig, Detector, Observation, RegionState, report_id
from synthwatch.stream_apps.detect.spikes import (
    SeriesState,
    SpikeConfig,
    SpikeModel,
    ears_c2,
    gamma_poisson_sf,
    poisson_sf,
)

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # a Monday
TRAMADOL = Subject("TVYLLZQTGLZFBW", "Tramadol", None, "other_opioid", False, True)
NITAZENE = Subject("NEWNITAZENEKEY", "Pentoxy-nitazene", "NEWNITAZENEKEY-UHFFFAOYSA-N", "nitazene", None, False)
COCAINE = Subject("ZPUCINDJVBIVPJ", "Cocaine", None, "other", True, True)
_ids = iter(range(10**9))


def obs(
    subject: Subject, at: datetime, region: str = "ML-BKO", grams: float | None = None, kind: str = "border_seizure"
) -> Observation:
    country = region.split("-")[0]
    return Observation(f"e{next(_ids)}", kind, at, day_of(at), country, region, subject, grams, None, None)


def feed(detector: Detector, items: list[Observation]) -> list:
    alerts = []
    for item in items:
        alerts.extend(detector.observe(item).alerts)
    return alerts


def steady(
    subject: Subject, days: int, per_day: int, region: str = "ML-BKO", start: datetime = T0, grams: float | None = None
) -> list[Observation]:
    return [
        obs(subject, start + timedelta(days=d, minutes=10 * k), region, grams)
        for d in range(days)
        for k in range(per_day)
    ]


def test_poisson_tail_is_exact_enough() -> None:
    assert poisson_sf(0, 3.0) == 1.0
    assert poisson_sf(1, 2.0) == pytest.approx(1 - 0.1353352832, rel=1e-9)
    assert poisson_sf(10, 1.0) == pytest.approx(1.1142547833e-07, rel=1e-6)
    assert 0 < poisson_sf(60, 1.0) < 1e-60  # upper tail summed directly, not 1 - (almost 1)


def test_predictive_tail_is_the_negative_binomial() -> None:
    # P(X >= 1) = 1 - (1 + scale)^-shape; a huge shape with a tiny scale is Poisson
    assert gamma_poisson_sf(1, 2.5, 0.1) == pytest.approx(1 - 1.1**-2.5, rel=1e-12)
    assert gamma_poisson_sf(4, 1e7, 2e-7) == pytest.approx(poisson_sf(4, 2.0), rel=1e-5)
    # a rate learnt from 3 reports is uncertain: 3 in a day is far less surprising than Poisson says
    assert gamma_poisson_sf(3, 3.5, 1 / 56) > 1.5 * poisson_sf(3, 3.5 / 56)
    assert gamma_poisson_sf(6, 1.5, 1 / 56) > 20 * poisson_sf(6, 1.5 / 56)
    assert 0 < gamma_poisson_sf(80, 2.0, 0.1) < 1e-60  # upper tail summed directly


def test_new_substance_fires_once_then_first_in_region_then_spread() -> None:
    detector = Detector(DetectionConfig(novelty=NoveltyConfig(spread_regions=3, spread_days=14)))
    alerts = feed(
        detector,
        [
            obs(NITAZENE, T0, "ML-BKO", kind="lab_detection"),
            obs(NITAZENE, T0 + timedelta(hours=3), "ML-BKO"),
            obs(NITAZENE, T0 + timedelta(days=2), "SN-DK"),
            obs(NITAZENE, T0 + timedelta(days=3), "SN-DK"),
            obs(NITAZENE, T0 + timedelta(days=5), "MA-CAS"),
        ],
    )
    kinds = [(a.alert_type, a.region, a.severity) for a in alerts]
    assert kinds == [
        ("new_substance", "ML-BKO", "critical"),  # a never-seen opioid is critical
        ("first_in_region", "SN-DK", "critical"),
        ("first_in_region", "MA-CAS", "critical"),
        ("spread", None, "critical"),
    ]
    assert alerts[0].triggered_at == T0 and len(alerts[0].evidence_event_ids) == 1
    assert "Never seen by the network" in alerts[0].summary


def test_catalogued_drug_the_network_never_saw_is_still_news() -> None:
    alerts = feed(Detector(), [obs(COCAINE, T0)])
    assert [(a.alert_type, a.severity) for a in alerts] == [("new_substance", "warning")]


def test_unresolved_name_is_info_not_critical() -> None:
    unknown = Subject("name:blueberrydream", "Blueberry dream", None, None, None, False)
    assert [a.severity for a in feed(Detector(), [obs(unknown, T0)])] == ["info"]


def test_alert_ids_are_deterministic_per_episode() -> None:
    first = feed(Detector(), [obs(NITAZENE, T0)])
    again = feed(Detector(), [obs(NITAZENE, T0 + timedelta(hours=1))])
    assert first[0].alert_id == again[0].alert_id == alert_id("new_substance", "ML-BKO", NITAZENE.key, "first")


def test_sparse_series_without_a_spike_stays_quiet() -> None:
    # 90 days of a sparse, noisy series (0-2 a day): the count model must not cry wolf
    import random

    rnd = random.Random(4)
    items = [
        obs(TRAMADOL, T0 + timedelta(days=d, hours=h)) for d in range(90) for h in range(rnd.choice([0, 0, 0, 1, 1, 2]))
    ]
    spikes = [a for a in feed(Detector(), items) if a.alert_type == "spike"]
    assert spikes == []


def test_count_spike_fires_intra_day_once_per_episode() -> None:
    detector = Detector()
    feed(detector, steady(TRAMADOL, 60, 1))
    burst_day = T0 + timedelta(days=60)
    alerts = feed(detector, [obs(TRAMADOL, burst_day + timedelta(minutes=20 * k)) for k in range(12)])
    spikes = [a for a in alerts if a.alert_type == "spike" and a.substance.key == TRAMADOL.key]
    assert len(spikes) == 1  # the same episode does not alert again
    spike = spikes[0]
    assert spike.metric == "count" and spike.triggered_at.date() == burst_day.date()  # intra-day
    assert spike.observed >= 3 and spike.expected < spike.observed / 2 and spike.score > 3
    assert spike.window_start <= spike.triggered_at < spike.window_end
    family = [a for a in alerts if a.alert_type == "spike" and a.substance.key == "family:other_opioid"]
    assert len(family) == 1  # region x family series alerts too
    # after a quiet cool-down, a new burst is a new episode with a new id
    feed(detector, steady(TRAMADOL, 14, 1, start=burst_day + timedelta(days=1)))
    later = burst_day + timedelta(days=15)
    again = [
        a
        for a in feed(detector, [obs(TRAMADOL, later + timedelta(minutes=k)) for k in range(12)])
        if a.alert_type == "spike" and a.substance.key == TRAMADOL.key
    ]
    assert len(again) == 1 and again[0].alert_id != spike.alert_id


def _burst(subject: Subject, start: datetime, per_day: list[int]) -> list[Observation]:
    return [obs(subject, start + timedelta(days=d, minutes=7 * k)) for d, n in enumerate(per_day) for k in range(n)]


def test_an_earlier_spike_in_the_baseline_does_not_hide_the_next() -> None:
    # 2 a day with a ×15 surge 11-13 days before the second, ×5 surge (on another weekday, so the
    # region's weekday rhythm does not absorb it): capping the surge days in the baseline keeps the
    # rate and dispersion those of the quiet days
    history = _burst(TRAMADOL, T0, [2] * 40 + [30, 30, 30] + [2] * 10)
    second = _burst(TRAMADOL, T0 + timedelta(days=53), [10])

    def second_alerts(config: SpikeConfig) -> list:
        detector = Detector(DetectionConfig(spike=config))
        feed(detector, history)
        return [a for a in feed(detector, second) if a.alert_type == "spike" and a.substance.key == TRAMADOL.key]

    assert len(second_alerts(SpikeConfig())) == 1
    assert second_alerts(SpikeConfig(baseline_cap_z=None)) == []  # the surge inflates the baseline


def test_a_second_surge_after_the_first_is_a_new_episode() -> None:
    detector = Detector()
    alerts = feed(detector, _burst(TRAMADOL, T0, [1] * 40 + [12, 12] + [1] * 6 + [12, 12]))
    spikes = [a for a in alerts if a.alert_type == "spike" and a.substance.key == TRAMADOL.key]
    # the 7-day window still crosses on the quiet days in between, yet the second surge is news
    assert [s.triggered_at.date() for s in spikes] == [(T0 + timedelta(days=d)).date() for d in (40, 48)]
    assert spikes[0].alert_id != spikes[1].alert_id


def test_young_series_is_not_tested_for_spikes() -> None:
    items = steady(TRAMADOL, 5, 1) + [obs(TRAMADOL, T0 + timedelta(days=5, minutes=k)) for k in range(20)]
    assert [a for a in feed(Detector(), items) if a.alert_type == "spike"] == []


def test_quantity_spike_on_far_larger_seizures() -> None:
    detector = Detector()
    import random

    rnd = random.Random(1)
    usual = [obs(TRAMADOL, T0 + timedelta(days=d), grams=rnd.lognormvariate(5, 0.5)) for d in range(40)]
    feed(detector, usual)
    big = [obs(TRAMADOL, T0 + timedelta(days=40, hours=h), grams=150 * 60.0) for h in (1, 2)]
    quantity = [a for a in feed(detector, big) if a.metric == "quantity"]
    assert len(quantity) == 1 and quantity[0].observed >= 9000
    assert quantity[0].substance.key == TRAMADOL.key  # mass is tested per substance, not per family


def test_sparse_series_learns_the_usual_seizure_from_its_family() -> None:
    import random

    rnd = random.Random(2)
    heroin = Subject("GVGLGOZIDCSQPN", "Heroin", None, "other_opioid", True, True)
    family = [obs(heroin, T0 + timedelta(days=d, hours=3), grams=rnd.lognormvariate(3, 1)) for d in range(40)]
    own = [obs(TRAMADOL, T0 + timedelta(days=d), grams=rnd.lognormvariate(3, 1)) for d in (5, 20)]
    big = [obs(TRAMADOL, T0 + timedelta(days=45, hours=h), grams=5000.0) for h in (1, 5, 9)]
    detector = Detector()
    feed(detector, sorted(family + own, key=lambda o: o.occurred_at))
    quantity = [a for a in feed(detector, big) if a.metric == "quantity"]
    assert [a.substance.key for a in quantity] == [TRAMADOL.key]  # two seizures of its own would not do
    assert quantity[0].triggered_at == big[1].occurred_at  # the second large seizure makes it

    alone = Detector()  # the same seizures with no family behind them: nothing to compare with
    feed(alone, own)
    assert [a for a in feed(alone, big) if a.metric == "quantity"] == []


def test_one_huge_seizure_alone_is_not_a_mass_spike_unless_configured() -> None:
    import random

    rnd = random.Random(3)
    usual = [obs(TRAMADOL, T0 + timedelta(days=d), grams=rnd.lognormvariate(3, 0.5)) for d in range(40)]
    huge = [obs(TRAMADOL, T0 + timedelta(days=41), grams=50_000.0)]
    assert [a for a in feed(Detector(), usual + huge) if a.metric == "quantity"] == []
    extreme = Detector(DetectionConfig(spike=SpikeConfig(mass_extreme_z=6.0)))
    assert len([a for a in feed(extreme, usual + huge) if a.metric == "quantity"]) == 1


def test_late_reports_count_in_their_day_and_later_ones_are_flagged_not_dropped() -> None:
    detector = Detector(DetectionConfig(lateness_hours=24))
    now = T0 + timedelta(days=10)
    feed(detector, [obs(TRAMADOL, now)])
    within = detector.observe(obs(TRAMADOL, now - timedelta(hours=20)))
    assert within.late_by_hours is None and not within.duplicate
    series = detector.regions.series[f"ML-BKO|{TRAMADOL.key}"]
    assert series.counts[day_of(now - timedelta(hours=20))] == 1  # counted in its own day
    region = detector.regions.regions["ML-BKO"]
    before = (dict(series.counts), dict(region.totals), dict(region.watermarks))
    late = detector.observe(obs(TRAMADOL, now - timedelta(hours=30)))
    assert late.late_by_hours == 30.0 and not late.duplicate  # kept (the worker stores it), flagged
    assert (dict(series.counts), dict(region.totals), dict(region.watermarks)) == before  # out of the spike series
    # lateness is per kind: a lab report of last week is not late because seizures are newer
    lab = detector.observe(obs(TRAMADOL, now - timedelta(days=7), kind="lab_detection"))
    assert lab.late_by_hours is None


def test_a_late_report_is_a_duplicate_only_when_resent() -> None:
    detector = Detector(DetectionConfig(lateness_hours=24))
    now = T0 + timedelta(days=30)
    feed(detector, [obs(TRAMADOL, now)])
    recent = obs(TRAMADOL, now - timedelta(hours=40))  # its day's ids are still kept: the region stage knows
    assert not detector.observe(recent).duplicate
    assert detector.observe(recent).duplicate
    old = obs(TRAMADOL, now - timedelta(days=20))  # ids of that day are pruned: what is stored decides
    first = detector.observe(old, stored=set())
    assert not first.duplicate and first.late_by_hours == 480.0
    again = detector.observe(old, stored={report_id(old)})
    assert again.duplicate and again.alerts == []
    other = obs(TRAMADOL, now - timedelta(days=20))
    other.event_id, other.reporter = old.event_id, "Douane FR"  # another reporter's report under that id
    assert not detector.observe(other, stored={report_id(old)}).duplicate


def _reported(by: str, event_id: str, at: datetime, kind: str = "lab_detection") -> Observation:
    item = obs(TRAMADOL, at, kind=kind)
    item.event_id, item.reporter = event_id, by
    return item


def test_two_reporters_with_one_event_id_are_both_counted_and_a_resend_is_a_duplicate() -> None:
    """Event ids are unique per reporter only: the region stage took lab-b's report for lab-a's re-send."""
    detector = Detector(DetectionConfig(lateness_hours=24))
    day = day_of(T0)
    assert not detector.observe(_reported("LAB-A", "2026-000123", T0)).duplicate
    assert not detector.observe(_reported("LAB-B", "2026-000123", T0 + timedelta(minutes=5))).duplicate
    assert detector.observe(_reported("LAB-B", "2026-000123", T0 + timedelta(minutes=5))).duplicate  # a re-send
    # a lab and an agency of one name are two reporters, too
    assert not detector.observe(_reported("LAB-A", "2026-000123", T0, kind="border_seizure")).duplicate
    region = detector.regions.regions["ML-BKO"]
    assert region.totals[day] == 3
    # the recent ids survive the changelog: a restored state still tells the two labs apart
    restored = RegionState.from_records(region.to_dict())
    assert restored.recent == region.recent and len(restored.recent[day]) == 3


def test_an_id_noted_before_ids_were_scoped_by_reporter_is_still_a_duplicate() -> None:
    """A region record written before the upgrade holds plain event ids: a re-send of one (whoever sends it:
    the record cannot tell) is a duplicate until its day is pruned, as before; a new id is not."""
    detector = Detector(DetectionConfig(lateness_hours=24))
    day = day_of(T0)
    old = RegionState.from_records({"w": {"lab_detection": T0.isoformat()}, "r": {str(day): ["2026-000123"]}})
    detector.regions.regions["ML-BKO"] = old
    assert detector.observe(_reported("LAB-A", "2026-000123", T0)).duplicate
    assert not detector.observe(_reported("LAB-A", "2026-000124", T0)).duplicate


def test_a_late_report_never_reopens_or_raises_a_decided_spike() -> None:
    detector = Detector(DetectionConfig(lateness_hours=24))
    history = steady(TRAMADOL, 42, 1)
    spike_day = T0 + timedelta(days=42)
    burst = [obs(TRAMADOL, spike_day + timedelta(minutes=5 * k)) for k in range(8)]
    alerts = feed(detector, history + burst)
    spikes = [a for a in alerts if a.alert_type == "spike"]
    assert len(spikes) >= 1, "the burst is a spike"
    newest = T0 + timedelta(days=45)
    feed(detector, [obs(TRAMADOL, newest)])
    name = f"ML-BKO|{TRAMADOL.key}"
    state = detector.regions.series[name].to_dict()
    region = detector.regions.regions["ML-BKO"]
    totals = dict(region.totals)
    # 20 late reports of the spike's day (an episode already raised) and of a quiet day (a window decided
    # without them): neither raises a spike, and the series is untouched.
    late = [obs(TRAMADOL, spike_day + timedelta(minutes=1 + k)) for k in range(20)]
    late += [obs(TRAMADOL, T0 + timedelta(days=38, minutes=k)) for k in range(20)]
    results = [detector.observe(item) for item in late]
    assert all(r.late_by_hours is not None and r.late_by_hours > 24 for r in results)
    assert [a for r in results for a in r.alerts if a.alert_type == "spike"] == []
    assert detector.regions.series[name].to_dict() == state
    assert region.totals == totals
    # on-time reports after them are judged as if the late ones had not come
    reference = Detector(DetectionConfig(lateness_hours=24))
    feed(reference, [*history, *burst, obs(TRAMADOL, newest)])
    after = [obs(TRAMADOL, newest + timedelta(hours=h)) for h in range(1, 30, 2)]
    assert [a.alert_id for a in feed(detector, after)] == [a.alert_id for a in feed(reference, after)]


def test_a_late_report_raises_novelty_alerts_first_by_occurrence_and_says_how_late() -> None:
    detector = Detector(DetectionConfig(lateness_hours=24))
    now = T0 + timedelta(days=20)
    feed(detector, [obs(TRAMADOL, now, "SN-DK", kind="lab_detection")])  # SN-DK's labs are up to date
    feed(detector, [obs(COCAINE, now, "ML-BKO", kind="lab_detection")])
    # Pentoxy-nitazene reported on time in ML-BKO first, then a lab report from SN-DK that occurred 362 h earlier
    feed(detector, [obs(NITAZENE, now, "ML-BKO", kind="lab_detection")])
    late = detector.observe(obs(NITAZENE, now - timedelta(hours=362), "SN-DK", kind="lab_detection"))
    assert late.late_by_hours == 362.0 and not late.duplicate
    (first,) = late.alerts
    assert first.alert_type == "first_in_region" and first.region == "SN-DK"
    assert first.reported_late and first.late_by_hours == 362.0
    assert "Reported late" in first.summary and "362.0 h" in first.summary
    assert "predates the network's first report received" in first.summary
    known = detector.novelty.state[NITAZENE.key]
    assert (known.first_day, known.first_region) == (day_of(now - timedelta(hours=362)), "SN-DK")  # by occurrence
    # a substance never seen, reported late: new_substance, late
    fresh = Subject("LATEKEY", "Late-azepam", None, "benzodiazepine", None, False)
    (new,) = detector.observe(obs(fresh, now - timedelta(hours=100), "ML-BKO", kind="lab_detection")).alerts
    assert new.alert_type == "new_substance" and new.reported_late and new.late_by_hours == 100.0
    # on-time alerts say nothing of lateness
    (on_time,) = detector.observe(obs(fresh, now + timedelta(hours=1), "SN-DK", kind="lab_detection")).alerts
    assert on_time.alert_type == "first_in_region" and not on_time.reported_late and on_time.late_by_hours is None
    assert "Reported late" not in on_time.summary


def test_a_resent_event_is_not_counted_twice() -> None:
    detector = Detector()
    item = obs(TRAMADOL, T0)
    assert not detector.observe(item).duplicate
    assert detector.observe(item).duplicate
    assert detector.regions.series[f"ML-BKO|{TRAMADOL.key}"].counts[day_of(T0)] == 1


def test_state_round_trips_through_plain_dicts() -> None:
    detector = Detector()
    feed(detector, [*steady(TRAMADOL, 30, 2, grams=10.0), obs(NITAZENE, T0 + timedelta(days=3), "SN-DK")])

    for name, series in detector.regions.series.items():
        again = SeriesState.from_dict(series.to_dict())
        assert (again.counts, again.grams, again.masses, again.first_day) == (
            series.counts,
            series.grams,
            series.masses,
            series.first_day,
        ), name
    region = detector.regions.regions["ML-BKO"]
    again_region = RegionState.from_dict(region.to_dict())
    assert (again_region.recent, again_region.forwarded, again_region.totals, again_region.watermarks) == (
        region.recent,
        region.forwarded,
        region.totals,
        region.watermarks,
    )
    for state in detector.novelty.state.values():
        assert SubstanceState.from_dict(state.to_dict()).to_dict() == state.to_dict()


def test_state_loaded_from_a_table_continues_where_it_stopped() -> None:
    first = Detector()
    items = steady(TRAMADOL, 50, 1)
    feed(first, items[:30])
    table = {key: value for _, key, value in first.regions.drain_dirty()}
    table.update({key: value for key, value in first.novelty.drain_dirty()})
    resumed = Detector()
    resumed.regions.fetch = table.get
    resumed.novelty.fetch = table.get
    reference = Detector()
    assert (
        feed(resumed, items[30:])
        == []
        == [a for a in feed(reference, items)[1:] if a.triggered_at > items[29].occurred_at]
    )
    assert (
        resumed.regions.series[f"ML-BKO|{TRAMADOL.key}"].counts
        == reference.regions.series[f"ML-BKO|{TRAMADOL.key}"].counts
    )


def test_ears_c2_reference() -> None:
    assert ears_c2([1, 0, 1, 0, 1, 0, 1, 0, 0, 6])
    assert not ears_c2([2, 3, 2, 3, 2, 3, 2, 0, 0, 3])


# --- the spike core's shortcuts give the plain computation's results -----------------------------------


class _EagerModel(SpikeModel):
    """The same model with every baseline's dispersion learnt at once (no lazy settling)."""

    def _baseline_rate(self, state: SeriesState, day: int, rhythm: Sequence[float]) -> list[Any] | None:
        parts = super()._baseline_rate(state, day, rhythm)
        if parts is not None:
            self._dispersion(state, parts)
        return parts


def _reports(draw: st.DrawFn) -> list[tuple[int, int, float | None]]:
    """(day, today, grams) reports of one series: mostly in order, some late, some from a lagging topic."""
    reports, today = [], 0
    for _ in range(draw(st.integers(60, 400))):
        today += draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
        lag = draw(st.sampled_from([0, 0, 0, 0, 1, 3, 12]))
        grams = draw(st.sampled_from([None, 1.0, 5.0, 250.0]))
        reports.append((max(0, today - lag), today, grams))
    return reports


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_lazy_dispersion_changes_no_finding(data: st.DataObject) -> None:
    """The lazily learnt dispersion is a shortcut: findings and stored state equal the eager way's,
    with late reports and reports from a lagging topic inside cached baselines."""
    reports = _reports(data.draw)
    rhythms = [[1.0] * 7, [0.6, 1.2, 1.1, 1.0, 0.9, 1.3, 0.9]]
    config = SpikeConfig(min_history_days=7, min_baseline_days=7)
    lazy, eager = SpikeModel(config), _EagerModel(config)
    lazy_state, eager_state = SeriesState(first_day=0), SeriesState(first_day=0)
    for i, (day, today, grams) in enumerate(reports):
        rhythm = rhythms[(today // 11) % 2]
        found = lazy.observe(lazy_state, day, today, f"e{i}", grams, rhythm)
        assert found == eager.observe(eager_state, day, today, f"e{i}", grams, rhythm)
    # the same stored state, but for the cached baseline, whose dispersion only the eager way has learnt
    assert {k: v for k, v in lazy_state.to_dict().items() if k != "b"} == {
        k: v for k, v in eager_state.to_dict().items() if k != "b"
    }


def test_a_series_filled_without_tests_holds_what_a_tested_one_holds() -> None:
    # The state rebuild fills its older days with ``test=False``: the series must hold the same counts,
    # masses and evidence as one tested on every report, and only the findings (and their episodes) are gone.
    model = SpikeModel()
    tested, filled = SeriesState(first_day=0), SeriesState(first_day=0)
    reports = [(day, 5.0 * (1 + day % 3)) for day in range(0, 40, 3)] + [(41, 900.0)] * 6
    found = []
    for n, (day, grams) in enumerate(reports):
        found += model.observe(tested, day, day, f"e{n}", grams, [1.0] * 7)
        assert model.observe(filled, day, day, f"e{n}", grams, [1.0] * 7, test=False) == []
    assert {f.metric for f in found} == {"count", "quantity"}  # a spike the filled series did not test
    for attribute in ("counts", "grams", "mass_days", "mass_values", "evidence_days", "evidence_ids", "pruned_day"):
        assert getattr(filled, attribute) == getattr(tested, attribute), attribute
    assert filled.episodes == {} and tested.episodes


def test_detection_config_from_settings_reads_the_detection_settings() -> None:
    """settings.py no longer builds the detectors' config (the floor does not import detect): the detect side reads
    the same settings, and what settings.py refuses it still refuses, with its message."""
    from pydantic import ValidationError

    from synthwatch.settings import Settings

    config = DetectionConfig.from_settings(Settings(lateness_hours=6.5, spread_regions=4, spread_days=9))
    assert config.lateness_hours == 6.5
    assert config.novelty == NoveltyConfig(spread_regions=4, spread_days=9)
    assert config.spike == DetectionConfig().spike, "spike thresholds keep their tuned defaults"
    assert DetectionConfig.from_settings(Settings()) == DetectionConfig()
    with pytest.raises(ValidationError, match="spread_regions"):
        Settings(spread_regions=1)
