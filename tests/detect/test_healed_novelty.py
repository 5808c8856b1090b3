"""The novelty stage's substance records recovered from the changelogs are healed of a far-future sighting taken
before the intake bounded event times: before, a 2099 sighting of a substance already sighted in its region ended
that region's span in 2099, so the region counted as active in every later spread test of the substance (one real
region fewer made a spread alert), for ever."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic_core import from_json, to_json

from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.alerting import day_of, day_start
from synthwatch.stream_apps.detect.novelty import HealedSubstance, NoveltyDetector, SubstanceState
from synthwatch.stream_apps.detect.region import Detector
from tests.detect.test_state_records import outcome, simulated
from tests.support.factories import sighting

START = datetime(2026, 11, 1, tzinfo=UTC)
D0 = day_of(START)
FAR = day_of(datetime(2099, 6, 1, tzinfo=UTC))
KEY = "NOVELSUBSTANCE"


def _seen(region: str, day: int, n: int = 0, **changes: Any) -> Sighting:
    country = region.split("-")[0]
    at = day_start(day) + timedelta(hours=10)
    return sighting(event_id=f"{region}-{day}-{n}", region=region, country=country, day=day, occurred_at=at, **changes)


def _alerts(detector: NoveltyDetector, sightings: list[Sighting]) -> list[str]:
    found = [a for s in sightings for a in detector.observe(s)]
    return [a.model_dump_json(exclude={"detected_at"}) for a in found]  # detected_at: the wall clock


def _write(detector: NoveltyDetector, table: dict[str, Any]) -> None:
    """A checkpoint: every changed record through JSON into the table (as the worker's changelog holds it)."""
    for key, value in detector.drain_dirty():
        table[key] = from_json(to_json(value))


def _restored(
    table: dict[str, Any], now: datetime | None, told: list[tuple[str, HealedSubstance]] | None = None
) -> NoveltyDetector:
    """A worker started at ``now`` on the table (None: no bound, records loaded as they are)."""
    detector = NoveltyDetector(fetch=table.get)
    if now is not None:
        detector.bound = lambda: now + timedelta(hours=24)
        detector.on_healed = lambda key, healed: (told if told is not None else []).append((key, healed))
    return detector


def _live(sightings: list[Sighting]) -> tuple[NoveltyDetector, dict[str, Any]]:
    detector, table = NoveltyDetector(), dict[str, Any]()
    _alerts(detector, sightings)
    _write(detector, table)
    return detector, table


def test_a_2099_sighting_recovered_from_the_changelog_no_longer_makes_a_spread() -> None:
    history = [_seen("FR-75C", D0), _seen("ML-BKO", D0 + 1)]
    bad = [_seen("ML-BKO", FAR, 1)]  # a lab's 2099 date, taken before the bound: ML-BKO's span ends in 2099
    between = [_seen("FR-75C", D0 + 2)]
    _, table = _live(history + bad + between)
    assert table[KEY]["g"]["ML-BKO"] == [D0 + 1, FAR]

    # 20 days on, two more regions: within 14 days only those two are active, so no spread (k = 3)...
    upgraded = [_seen("DE-BE", D0 + 20), _seen("ES-MD", D0 + 20)]
    never, _ = _live(history + between)
    expected = _alerts(never, upgraded)
    assert [from_json(a)["alert_type"] for a in expected] == ["first_in_region", "first_in_region"]
    # ... the 2099 span made ML-BKO the third, in every spread test of the substance from then on, while the test
    # counted spans; it counts the regions whose day bits hold a report in the window, and ML-BKO's are in 2099.
    unhealed = _alerts(_restored(dict(table), None), upgraded)
    assert unhealed == expected

    now = START + timedelta(days=20, hours=12)  # the upgraded worker's clock
    told: list[tuple[str, HealedSubstance]] = []
    healed = _restored(table, now, told)
    assert _alerts(healed, upgraded) == expected, "judged as if the 2099 sighting had not been there"
    assert healed.state[KEY].to_dict() == never.state[KEY].to_dict()  # this record lost nothing: ML-BKO's one day
    assert told == [(KEY, HealedSubstance({"ML-BKO": (FAR, D0 + 1)}, [], None, False))]

    # Written back: the changelog holds the healed record, which a worker with no bound at all reads as sound.
    _write(healed, table)
    assert table[KEY]["g"]["ML-BKO"] == [D0 + 1, D0 + 1]
    again: list[tuple[str, HealedSubstance]] = []
    later = _restored(table, now + timedelta(days=1), again)
    assert _alerts(later, [_seen("IT-RM", D0 + 21)]) == _alerts(never, [_seen("IT-RM", D0 + 21)])
    assert again == [], "healed once"


def test_a_substance_sighted_only_in_2099_is_new_when_first_sighted_for_real() -> None:
    bad = [_seen("ML-BKO", FAR, formerly="name:junk", formerly_regions=["GH-AA"])]
    detector, table = NoveltyDetector(), dict[str, Any]()
    detector.observe_batch([(s, ("sightings:0", 7)) for s in bad])
    _write(detector, table)

    told: list[tuple[str, HealedSubstance]] = []
    healed = _restored(table, START + timedelta(days=3), told)
    real = [_seen("FR-75C", D0 + 3)]
    alerts, taken = healed.observe_batch([(real[0], ("sightings:0", 8))])
    never = NoveltyDetector()
    assert [a.model_dump_json(exclude={"detected_at"}) for a in alerts] == _alerts(never, real)
    assert [a.alert_type for a in alerts] == ["new_substance"] and taken == 1
    assert told == [(KEY, HealedSubstance({}, ["ML-BKO"], None, True))]
    record = healed.state[KEY]
    assert record.applied == {"sightings:0": 8}, "its replay marks stay: the 2099 message is not taken again"
    assert {k: v for k, v in record.to_dict().items() if k != "a"} == {
        k: v for k, v in never.state[KEY].to_dict().items() if k != "a"
    }
    assert healed.observe_batch([(bad[0], ("sightings:0", 7))]) == ([], 0)


def test_a_near_future_sighting_leaves_the_newest_real_day_its_bits_hold() -> None:
    """A sighting a few days ahead (inside the days a record's bits reach): the region ends on its newest real day,
    and a sighting of that day sent again is still recognised."""
    history = [_seen("FR-75C", D0), _seen("FR-75C", D0 + 2)]
    _, table = _live([*history, _seen("FR-75C", D0 + 5, 1)])
    healed = _restored(table, day_start(D0 + 2) + timedelta(hours=12))  # bound: day D0 + 3
    never, _ = _live(history)
    assert healed.get(KEY) is not None and healed.state[KEY].to_dict() == never.state[KEY].to_dict()
    assert healed.state[KEY].days["FR-75C"] == 0b101
    assert _alerts(healed, [_seen("FR-75C", D0 + 2)]) == [] and not healed.state[KEY].sighted("FR-75C", D0 + 4, 31)


def test_a_spread_episode_a_far_sighting_started_goes_one_it_prolonged_ends_on_the_bound() -> None:
    last = D0 + 10
    record = SubstanceState("A", D0, regions={"A": [D0, D0], "B": [D0, FAR], "C": [FAR, FAR]}, spread=[FAR, FAR])
    record.days = {"A": 1, "B": 1, "C": 1}
    healed = record.heal(last)
    assert healed == HealedSubstance({"B": (FAR, D0)}, ["C"], [FAR, FAR], False)
    assert (
        record.regions == {"A": [D0, D0], "B": [D0, D0]} and record.spread is None and record.days == {"A": 1, "B": 1}
    )
    assert record.heal(last) is None

    record = SubstanceState("A", D0, regions={"A": [D0, D0 + 2]}, spread=[D0 + 2, FAR], days={"A": 0b101})
    assert record.heal(last) == HealedSubstance({}, [], [D0 + 2, FAR], False)
    assert record.spread == [D0 + 2, last] and record.regions == {"A": [D0, D0 + 2]}


def test_sound_state_is_never_healed() -> None:
    """Region and substance stages restored at batch boundaries of a simulated stream with late and re-sent reports
    continue exactly as the live one, and nothing is healed, though the bound is the tightest a sound record allows:
    the newest event time taken so far (as a report dated the full SYNTHWATCH_MAX_FUTURE_HOURS after its receipt
    leaves it), so its day holds sightings. A bound 24 h past that let a heal that took a span or a spread episode
    ending on the bound's day for a far one pass (``>`` made ``>=`` in SubstanceState.heal)."""
    items = simulated()
    live, table = Detector(), dict[str, Any]()
    told: list[tuple[str, object]] = []
    newest = items[0].occurred_at

    def restored() -> Detector:
        detector = Detector()
        detector.regions.fetch = detector.novelty.fetch = table.get
        bound = newest  # the bound (clock + 24 h): the newest event time so far
        detector.regions.bound = detector.novelty.bound = lambda: bound
        detector.regions.on_healed = lambda key, healed: told.append((key, healed))
        detector.novelty.on_healed = lambda key, healed: told.append((key, healed))
        return detector

    spreads = 0
    for n in range(0, len(items), 1500):
        resumed = restored()
        for item in items[n : n + 1500]:
            newest = max(newest, item.occurred_at)
            result = outcome(resumed, item)
            assert result == outcome(live, item), item.event_id
            spreads += sum('"alert_type":"spread"' in a for a in result[2])
        live.regions.drain_dirty()
        live.novelty.drain_dirty()
        for _, key, value in resumed.regions.drain_dirty():
            table[key] = from_json(to_json(value))
        for key, value in resumed.novelty.drain_dirty():
            table[key] = from_json(to_json(value))
    assert told == [] and spreads > 0, spreads


def test_the_far_reports_region_shares_its_alert_id_only_when_the_type_is_the_same() -> None:
    """As docs/detection.md says: a 2099 report that was the substance's first raised new_substance in its region;
    with real regions after it, the next real report there raises first_in_region, another id (delivery sends it)."""
    detector = NoveltyDetector()
    far = detector.observe(_seen("ML-BKO", FAR))
    detector.observe(_seen("FR-75C", D0))
    table: dict[str, Any] = {}
    _write(detector, table)
    healed = _restored(table, START + timedelta(days=1))
    (again,) = healed.observe(_seen("ML-BKO", D0 + 1))
    assert [a.alert_type for a in far] == ["new_substance"] and again.alert_type == "first_in_region"
    assert again.alert_id != far[0].alert_id


def test_a_healed_record_is_written_back_and_told_once_though_its_sighting_changes_nothing() -> None:
    """Loaded for a sighting it holds already (a region stage's replay), the healed record is still written back at
    the next checkpoint (else every later start heals and logs it again), and a reload before that checkpoint (a
    rebalance: ``forget``) heals it again without telling again."""
    history = [_seen("FR-75C", D0), _seen("ML-BKO", D0 + 1)]
    _, table = _live([*history, _seen("ML-BKO", FAR, 1)])
    told: list[tuple[str, HealedSubstance]] = []
    healed = _restored(table, START + timedelta(days=3), told)
    assert _alerts(healed, [history[0]]) == [], "a sighting taken already"
    assert [key for key, _ in healed.drain_dirty()] == [KEY]
    healed.forget()
    assert healed.get(KEY) is not None and healed.state[KEY].regions["ML-BKO"] == [D0 + 1, D0 + 1]
    assert [key for key, _ in told] == [KEY], "told once"


def test_an_emptied_record_keeps_its_replay_marks_whatever_partition_its_next_sighting_comes_from() -> None:
    """A record healed of every sighting it held is written back as never seen (no region, spread, names), with
    its replay marks; the next real sighting keeps them, so the 2099 message read again after a repartition (the
    real one on another partition) is still skipped."""
    bad = _seen("ML-BKO", FAR, formerly="name:junk", formerly_regions=["GH-AA"])
    detector, table = NoveltyDetector(), dict[str, Any]()
    detector.observe_batch([(bad, ("sightings:0", 7))])
    _write(detector, table)
    healed = _restored(table, START + timedelta(days=3))
    assert healed.get(KEY) is not None
    written = dict(healed.drain_dirty())[KEY]
    assert {k: v for k, v in written.items() if k not in ("r", "d")} == {
        "g": {},
        "s": None,
        "m": {},
        "a": {"sightings:0": 7},
    }
    alerts, taken = healed.observe_batch([(_seen("FR-75C", D0 + 3), ("sightings:1", 2))])
    assert [a.alert_type for a in alerts] == ["new_substance"] and taken == 1
    assert healed.observe_batch([(bad, ("sightings:0", 7))]) == ([], 0)
    assert healed.state[KEY].regions == {"FR-75C": [D0 + 3, D0 + 3]}


def test_a_2099_sighting_read_only_after_the_upgrade_is_healed_at_once() -> None:
    """A 2099 sighting a region stage sent before the bound and the novelty stage reads only after the upgrade (in
    flight then) is taken as before, and its record healed at once, as it would be when next loaded: before, the
    loaded record was sound, so the span it ended in 2099 stayed in memory and made the spread below."""
    history = [_seen("FR-75C", D0), _seen("ML-BKO", D0 + 1)]
    _, table = _live(history)
    told: list[tuple[str, HealedSubstance]] = []
    detector = _restored(table, START + timedelta(days=20, hours=12), told)
    alerts, taken = detector.observe_batch([(_seen("ML-BKO", FAR, 1), ("sightings:0", 3))])
    assert alerts == [] and taken == 1
    assert told == [(KEY, HealedSubstance({"ML-BKO": (FAR, D0 + 1)}, [], None, False))]
    assert detector.state[KEY].regions["ML-BKO"] == [D0 + 1, D0 + 1]
    assert detector.state[KEY].applied == {"sightings:0": 3}, "taken: not read again"
    upgraded = [(_seen("DE-BE", D0 + 20), ("sightings:0", 4)), (_seen("ES-MD", D0 + 20), ("sightings:0", 5))]
    later, _ = detector.observe_batch(upgraded)
    assert [a.alert_type for a in later] == ["first_in_region", "first_in_region"]
    assert [key for key, _ in detector.drain_dirty()] == [KEY]


def test_a_sighting_a_day_past_the_bounds_day_is_left_to_the_next_load() -> None:
    """The intake bounded the report by its receipt (at most that worker's clock), the novelty stage by its own
    worker's clock: a sighting on the day after the bound's day may be sound under a little skew between the two near
    midnight, so it is not healed at once (its region would go, and its next sighting alert it again)."""
    _, table = _live([_seen("FR-75C", D0)])
    told: list[tuple[str, HealedSubstance]] = []
    now = day_start(D0) + timedelta(hours=23, minutes=59)  # bound: D0 + 1, 23:59
    detector = _restored(table, now, told)
    alerts, _ = detector.observe_batch([(_seen("ML-BKO", D0 + 2), ("sightings:0", 1))])
    assert [a.alert_type for a in alerts] == ["first_in_region"] and told == []
    assert detector.state[KEY].regions["ML-BKO"] == [D0 + 2, D0 + 2]
