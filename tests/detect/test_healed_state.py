"""Detector state recovered from the changelogs is healed of a far-future report taken before the intake bounded
event times: before, a 2099 report's watermark came back with every restart, and every later report of its region
and kind was late (left out of spikes) for ever; the only way out was to start once with empty state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic_core import from_json, to_json

from synthwatch.stream_apps.detect.alerting import day_of, day_start
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.region import KIND_SKEW_DAYS, Detector, Healed, Observation, RegionState
from tests.detect.test_state_records import outcome, simulated
from tests.support.factories import lab, seizure

START = datetime(2026, 11, 1, tzinfo=UTC)
REGION = "ML-BKO"
FUTURE = "2099-06-01T10:00:00+00:00"


def _observations(records: list[dict[str, Any]]) -> list[Observation]:
    """As the intake made them before event times were bounded (no receipt time: only the schema's bound)."""
    messages = [RawMessage(f"t:0:{n}", json.dumps(r)) for n, r in enumerate(records)]
    result = Intake(stage="backtest").process(messages)
    assert not result.rejects
    return [Observation.of(e) for e in result.events]


def _day(n: int) -> list[dict[str, Any]]:
    """A seizure and a lab report of day ``n`` in one region."""
    at = START + timedelta(days=n)
    return [
        seizure(event_id=f"s-{n}", seizure_id=f"S-{n}", occurred_at=(at + timedelta(hours=10)).isoformat()),
        lab(
            event_id=f"l-{n}",
            sample_id=f"L-{n}",
            country="ML",
            region=REGION,
            occurred_at=(at + timedelta(hours=9)).isoformat(),
        ),
    ]


def _write(detector: Detector, table: dict[str, Any]) -> None:
    """A checkpoint: every changed record through JSON into the table (as the worker's changelog holds it)."""
    for _, key, value in detector.regions.drain_dirty():
        table[key] = from_json(to_json(value))
    for key, value in detector.novelty.drain_dirty():
        table[key] = from_json(to_json(value))


def _restored(table: dict[str, Any], now: datetime | None, told: list[tuple[str, Healed]] | None = None) -> Detector:
    """A worker started at ``now`` on the table (None: no bound, records loaded as they are)."""
    detector = Detector()
    detector.regions.fetch = detector.novelty.fetch = table.get
    if now is not None:
        detector.regions.bound = lambda: now + timedelta(hours=24)
        detector.regions.on_healed = lambda key, healed: (told if told is not None else []).append((key, healed))
    return detector


def _late(detector: Detector, items: list[Observation]) -> list[float | None]:
    return [detector.observe(o).late_by_hours for o in items]


def test_a_2099_watermark_recovered_from_the_changelog_is_healed_and_todays_report_counts() -> None:
    history = _observations([r for n in range(30) for r in _day(n)])
    bad = _observations(
        [seizure(event_id="sz-2099", seizure_id="S-2099", occurred_at=FUTURE, substance={"name": "Junk"})]
    )
    between = _observations([r for n in range(30, 33) for r in _day(n)])  # after it, before the upgrade
    upgraded = _observations([r for n in range(33, 40) for r in _day(n)])

    # Before the upgrade: the 2099 seizure was taken, and the region's later seizures were late.
    before, table = Detector(), dict[str, Any]()
    for o in history + bad:
        before.observe(o)
    late_between = _late(before, between)
    assert late_between[0::2] == [x for x in late_between[0::2] if x is not None and x > 600_000], late_between
    assert late_between[1::2] == [None] * 3  # labs: another kind's watermark
    _write(before, table)

    # The upgraded worker starts on day 33 (its clock) with that state recovered from the changelog.
    now = START + timedelta(days=33, hours=12)
    told: list[tuple[str, Healed]] = []
    healed = _restored(table, now, told)
    first = healed.observe(upgraded[0])  # a seizure of today
    assert first.late_by_hours is None and not first.duplicate, "today's report counts (it was 635,448 h late)"
    state = healed.regions.regions[REGION]
    today = day_of(upgraded[0].occurred_at)
    assert state.watermarks["border_seizure"] == upgraded[0].occurred_at
    assert state.totals[today] == 1 and max(state.totals) == today
    assert max(state.recent) == today and max(state.forwarded) == today
    assert healed.regions.series[f"{REGION}|{upgraded[0].subject.key}"].counts[today] == 1, "counted in its spikes"

    # The rest of the week counts as in a region that never had the 2099 report; a truly late report stays late.
    never = Detector()
    for o in history + between:
        never.observe(o)
    never.observe(upgraded[0])
    resent_late = _observations([seizure(event_id="s-old", seizure_id="S-old", occurred_at="2026-11-20T10:00:00Z")])
    judged = _late(healed, upgraded[1:] + resent_late)
    assert judged == _late(never, upgraded[1:] + resent_late)
    assert judged[:-1] == [None] * 13 and judged[-1] == 480.0

    # Told once: the region (its seizure watermark, none kept to go back to; its 2099 day; its pruning as of 2099).
    # The series the labs' reports pruned as of 2099 in between are healed too (their pruning day forgotten), not
    # told one by one: a region's every series may be among them.
    # Pruned as of the slowest kind's day, at most KIND_SKEW_DAYS behind the newest: the labs' is older.
    far = day_of(datetime.fromisoformat(FUTURE))
    pruned = far - KIND_SKEW_DAYS
    assert told == [(f"R:{REGION}", Healed({"border_seizure": (datetime.fromisoformat(FUTURE), None)}, [far], pruned))]

    # Written back: the changelog holds the healed state, which a worker with no bound at all reads as sound.
    _write(healed, table)
    again = RegionState.from_records(table[f"R:{REGION}"], table.get(f"R+:{REGION}"))
    assert day_of(max(again.watermarks.values())) < far and max(again.totals) < far and max(again.recent) < far
    later = _restored(table, None)
    assert _late(later, _observations(_day(40))) == [None, None]


def test_the_series_of_the_2099_report_is_healed_too() -> None:
    history = _observations([r for n in range(30) for r in _day(n)])
    bad = _observations(
        [seizure(event_id="sz-2099", seizure_id="S-2099", occurred_at=FUTURE, substance={"name": "Junk"})]
    )
    before, table = Detector(), dict[str, Any]()
    for o in history + bad:
        before.observe(o)
    _write(before, table)
    name = f"{REGION}|{bad[0].subject.key}"
    far = day_of(bad[0].occurred_at)
    assert far in table[f"S:{name}"]["c"][0]

    told: list[tuple[str, Healed]] = []
    healed = _restored(table, START + timedelta(days=31), told)
    junk_today = _observations(
        [seizure(event_id="j-31", seizure_id="J-31", occurred_at="2026-12-02T08:00:00Z", substance={"name": "Junk"})]
    )
    assert healed.observe(junk_today[0]).late_by_hours is None
    series = healed.regions.series[name]
    assert list(series.counts) == [day_of(junk_today[0].occurred_at)] and series.evidence_ids == ["j-31"]
    assert [key for key, _ in told] == [f"R:{REGION}", f"S:{name}"] and told[1][1].days == [far]
    _write(healed, table)
    assert far not in table[f"S:{name}"]["c"][0] and table[f"S:{name}"]["c"][0] == [day_of(junk_today[0].occurred_at)]


def test_a_watermark_goes_back_to_the_newest_kept_day_of_its_kind() -> None:
    """A report a few days ahead (inside what is kept): its kind's watermark goes back to the start of the newest
    day before the bound's with an id of that kind; the other kind's, within the bound, stays; the far day goes."""
    day = day_of(START) + 33
    bound = day_start(day + 1) + timedelta(hours=12)
    lab_time = day_start(day) + timedelta(hours=9)
    state = RegionState(
        watermarks={"border_seizure": day_start(day + 3) + timedelta(hours=10), "lab_detection": lab_time},
        recent={
            day - 1: {"agency:Douanes\x1fs-1", "plain-old-id"},
            day: {"lab:LAB-1\x1fl-1", "plain-old-id-2"},  # no seizure that day: a plain id's kind is unknown
            day + 1: {"lab:LAB-1\x1fl-2", "agency:Douanes\x1fs-2"},  # the bound's day: its seizure may be the bad one
            day + 3: {"agency:Douanes\x1fs-far"},
        },
        forwarded={day: {"k"}, day + 3: {"k"}},
        totals={day - 1: 1, day: 1, day + 1: 2, day + 3: 1},
        rhythm={day + 3: [1.0] * 7},
        first_day=day - 1,
        pruned_day=day + 3,
        full_due=False,
    )
    healed = state.heal(bound)
    assert healed is not None and healed.days == [day + 3]
    assert healed.watermarks == {"border_seizure": (day_start(day + 3) + timedelta(hours=10), day_start(day - 1))}
    assert state.watermarks == {"border_seizure": day_start(day - 1), "lab_detection": lab_time}
    assert sorted(state.recent) == [day - 1, day, day + 1] and sorted(state.totals) == [day - 1, day, day + 1]
    assert list(state.forwarded) == [day] and state.rhythm == {}
    assert state.pruned_day is None and state.first_day == day - 1 and state.full_due
    assert state.heal(bound) is None, "healed once"


def test_sound_state_is_never_healed() -> None:
    """A detector restored at batch boundaries of a simulated stream with late and re-sent reports continues exactly
    as the live one, and nothing is healed, though the bound is the tightest a sound record allows: the newest event
    time taken so far (as a report dated the full SYNTHWATCH_MAX_FUTURE_HOURS after its receipt leaves it), so its
    day holds reports. A bound 24 h past that (as before) let a heal that took a record at the bound, or a day on
    the bound's day, for a far one pass: no record comes near such a bound."""
    items = simulated()
    live, table = Detector(), dict[str, Any]()
    told: list[tuple[str, Healed]] = []
    newest = items[0].occurred_at
    for n in range(0, len(items), 1500):
        resumed = _restored(table, newest - timedelta(hours=24), told)  # the bound: the newest event time so far
        for item in items[n : n + 1500]:
            newest = max(newest, item.occurred_at)
            assert outcome(resumed, item) == outcome(live, item), item.event_id
        live.regions.drain_dirty()
        live.novelty.drain_dirty()
        _write(resumed, table)
    assert told == []


def test_a_late_report_right_after_healing_is_judged_by_the_settled_day_as_pruning_is() -> None:
    """Healing forgets the pruning day; until the next pruning, a late report was judged against the newest kind's
    day while pruning keeps ids as of the slowest kind's (the settled day): a late report of a day whose ids the
    region keeps was taken as from a pruned day, its id not noted, and its re-send sighted again as a first report.
    Judged as the state with its pruning day is: the re-send is a duplicate."""
    labs = [_day(n)[1] for n in range(30)]  # lab reports every day to day 29
    seizures = [_day(n)[0] for n in range(10)]  # seizures stop at day 9: the settled day is 29 - KIND_SKEW_DAYS
    late = _observations(
        [
            lab(
                event_id="l-late",
                sample_id="L-late",
                country="ML",
                region=REGION,
                occurred_at=(START + timedelta(days=20, hours=9)).isoformat(),
                substance={"name": "Junk"},
            )
        ]
    )[0]

    def judged(forget_pruning: bool) -> list[tuple[float | None, bool]]:
        detector = Detector()
        for o in _observations(labs + seizures):
            detector.observe(o)
        state = detector.regions.regions[REGION]
        assert state.pruned_day == day_of(START) + 29 - KIND_SKEW_DAYS
        if forget_pruning:  # as healing does (RegionState.heal)
            state.pruned_day = None
        return [(r.late_by_hours, r.duplicate) for r in (detector.observe(late), detector.observe(late))]

    assert judged(forget_pruning=True) == judged(forget_pruning=False) == [(216.0, False), (216.0, True)]
