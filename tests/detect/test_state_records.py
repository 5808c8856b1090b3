"""Detector state written as changelog records (full record + deltas) and read back behaves as the live one.

The worker writes what ``drain_dirty`` gives at every checkpoint as JSON (pydantic-core) and, after a
restart or a rebalance, reads it back through ``fetch``. A detector restored that way at any batch
boundary must give exactly the alerts, sightings, duplicates and late reports the live one gives.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

from faust.serializers import codecs
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import from_json, to_json

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.stream_apps.detect.alerting import Subject, day_of
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.region import Detector, Observation, RegionState
from synthwatch.stream_apps.detect.spikes import SeriesState


@cache
def simulated() -> list[Observation]:
    """A simulated stream with spikes, late reports and re-sent events (file order, as the backtest)."""
    sim = simulate(SimulationConfig(days=70, seed=11, start=date(2026, 1, 1), warmup_days=35, events_per_day=200))
    intake = Intake(stage="backtest")
    found: list[Observation] = []
    for i in range(0, len(sim.lines), 500):
        chunk = [RawMessage(f"sim:{i + j}", line) for j, line in enumerate(sim.lines[i : i + 500])]
        found.extend(Observation.of(e) for e in intake.process(chunk).events)
    return found


def lagged(items: list[Observation], kind: str, lag: int) -> list[Observation]:
    """``kind``'s reports delivered ``lag`` places late, as when its topic lags the other one."""
    keyed = [(i + (lag if o.kind == kind else 0), i, o) for i, o in enumerate(items)]
    return [o for _, _, o in sorted(keyed, key=lambda t: (t[0], t[1]))]


def outcome(detector: Detector, item: Observation) -> tuple[Any, ...]:
    result = detector.observe(item)
    alerts = [a.model_dump_json(exclude={"detected_at"}) for a in result.alerts]  # detected_at: the wall clock
    return (result.duplicate, result.late_by_hours, alerts)


def write(detector: Detector, table: dict[str, Any]) -> None:
    """What the worker does at a checkpoint: every changed record as JSON (pydantic-core), read back from it."""
    changes = [(key, value) for _, key, value in detector.regions.drain_dirty()]
    changes += detector.novelty.drain_dirty()
    for key, value in changes:
        table[key] = from_json(to_json(value))


def drain(detector: Detector) -> None:
    """A checkpoint of the live detector: its changed records are taken (which decides full record or delta
    next time) but never read back, so not serialised (that was half the test's CPU for nothing)."""
    detector.regions.drain_dirty()
    detector.novelty.drain_dirty()


def restored(table: dict[str, Any]) -> Detector:
    detector = Detector()
    detector.regions.fetch = table.get
    detector.novelty.fetch = table.get
    return detector


@settings(max_examples=8, deadline=None)
@given(
    batch=st.sampled_from([5, 60, 400, 3000]),
    restarts=st.lists(st.integers(0, 60), min_size=1, max_size=4, unique=True),
    lag=st.sampled_from([0, 0, 150, 2000]),
)
def test_a_detector_restored_from_its_records_continues_as_the_live_one(
    batch: int, restarts: list[int], lag: int
) -> None:
    items = lagged(simulated(), "lab_detection", lag) if lag else simulated()
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    # restarts at batch boundaries spread over the stream (most of it is after the warm-up)
    points = {min(len(batches) - 1, int(len(batches) * r / 61)) for r in restarts}
    live, resumed, table = Detector(), Detector(), {}
    alerts = 0
    for n, chunk in enumerate(batches):
        if n in points:
            resumed = restored(table)
        for item in chunk:
            expected = outcome(live, item)
            assert outcome(resumed, item) == expected, (n, item.event_id)
            alerts += len(expected[2])
        drain(live)
        write(resumed, table)
    assert alerts > 100  # the stream raises alerts of every kind, so the comparison means something


def test_records_read_back_equal_the_live_state() -> None:
    """Full records and deltas read back give the live state's persisted fields, in the same order."""
    detector, table, observations = Detector(), {}, simulated()
    for i in range(0, len(observations), 250):
        for item in observations[i : i + 250]:
            detector.observe(item)
        write(detector, table)
    kinds = {key.split(":", 1)[0] for key in table}
    assert {"R", "R+", "S", "S+"} <= kinds  # both records of both states were written
    for name, live in detector.regions.series.items():
        back = SeriesState.from_records(table[f"S:{name}"], table.get(f"S+:{name}"))
        assert list(back.counts.items()) == list(live.counts.items()), name
        assert list(back.grams.items()) == list(live.grams.items()), name
        assert (back.masses, back.evidence, back.episodes, back.first_day) == (
            live.masses,
            live.evidence,
            live.episodes,
            live.first_day,
        ), name
    for region, state in detector.regions.regions.items():
        again = RegionState.from_records(table[f"R:{region}"], table.get(f"R+:{region}"))
        assert (again.watermarks, again.recent, again.forwarded, again.totals, again.first_day) == (
            state.watermarks,
            state.recent,
            state.forwarded,
            state.totals,
            state.first_day,
        ), region


def test_a_full_record_is_rewritten_only_when_its_delta_grows() -> None:
    """Most writes of a busy series are deltas; a delta's size does not grow with the history."""
    subject = Subject("KEY", "Substance", None, None, False, True)
    detector, sizes, fulls = Detector(), [], 0
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(3000):  # 60 days, 50 reports a day, one write per report
        at = start + timedelta(minutes=n * 28.8)
        detector.observe(
            Observation(f"e{n}", "border_seizure", at, day_of(at), "ML", "ML-BKO", subject, 5.0 + n % 7, None, None)
        )
        for _, key, value in detector.regions.drain_dirty():
            if key.startswith("S"):
                fulls += key.startswith("S:")
                sizes.append(len(to_json(value)) if key.startswith("S+") else 0)
    deltas = [s for s in sizes if s]
    assert fulls < len(sizes) / 10
    assert max(deltas[-500:]) <= max(deltas[:500]) * 1.5


def test_a_written_record_does_not_follow_later_changes() -> None:
    """What drain_dirty gave stays what was written: the worker keeps it in its table as the last durable state."""
    detector = Detector()
    items = simulated()[:3000]
    for item in items[:1500]:
        detector.observe(item)
    table = {key: value for _, key, value in detector.regions.drain_dirty()}
    table.update(detector.novelty.drain_dirty())
    frozen = to_json(table)
    for item in items[1500:]:
        detector.observe(item)
    assert to_json(table) == frozen


def previous_format(detector: Detector) -> dict[str, Any]:
    """The records the previous code wrote: one whole record per series and region, pairs, no generation."""
    table: dict[str, Any] = {}
    for name, s in detector.regions.series.items():
        table[f"S:{name}"] = {
            "f": s.first_day,
            "c": [[d, n] for d, n in s.counts.items()],
            "g": [[d, g] for d, g in s.grams.items()],
            "m": [[d, v] for d, v in s.masses],
            "e": {k: [v.start_day, v.last_day] for k, v in s.episodes.items()},
            "v": [[d, i] for d, i in s.evidence],
        }
    for region, r in detector.regions.regions.items():
        table[f"R:{region}"] = {
            "w": {kind: moment.isoformat() for kind, moment in r.watermarks.items()},
            "r": {str(d): sorted(ids) for d, ids in r.recent.items()},
            "f": {str(d): sorted(keys) for d, keys in r.forwarded.items()},
            "t": {str(d): n for d, n in r.totals.items()},
            "d": r.first_day,
        }
    table.update(detector.novelty.drain_dirty())
    # as the previous worker wrote them: Faust's json codec
    return {key: codecs.loads("json", codecs.dumps("json", value)) for key, value in table.items()}


def test_records_of_the_previous_format_are_read() -> None:
    """A worker upgraded over a changelog the previous code wrote continues from it (in-order stream)."""
    items = simulated()
    live = Detector()
    for item in items[:8000]:
        live.observe(item)
    resumed = restored(previous_format(live))
    for item in items[8000:]:
        assert outcome(resumed, item) == outcome(live, item), item.event_id
    table: dict[str, Any] = {}
    write(resumed, table)  # the upgraded state is written in the new format from then on
    assert all("g" in value for key, value in table.items() if key[0] in "RS")


def test_spike_alerts_wait_in_the_outbox_of_their_series_record_until_sent() -> None:
    """The worker's outbox: a spike alert is in the record of the series that raised it (full or delta), read
    back whole after a restart, and gone from the record written after it was sent. Alerts are unchanged."""
    plain, held, table = Detector(), Detector(), {}
    held.regions.outbox = True
    spikes: list[str] = []
    sent_and_written = 0
    for i in range(0, len(simulated()), 250):
        for item in simulated()[i : i + 250]:
            expected = [a.model_dump_json(exclude={"detected_at"}) for a in plain.observe(item).alerts]
            got = held.observe(item).alerts
            assert [a.model_dump_json(exclude={"detected_at"}) for a in got] == expected
            spikes += [a.model_dump_json() for a in got if a.alert_type == "spike"]
        write(held, table)
        outbox = held.regions.take_outbox()
        # What a checkpoint is about to send is in the records just written, and reads back the same.
        restarted = restored(table)
        restarted.regions.restore_outboxes(name for name, _, _ in outbox)
        again = {name: entries for name, _, entries in restarted.regions.take_outbox()}
        for name, state, entries in outbox:
            assert again[name] == entries == state.outbox
            assert [e for e in entries if e not in spikes] == []
        for name, state, entries in outbox:
            held.regions.sent(name, state, len(entries))
        write(held, table)  # the write after the sends: records without them
        for name, _, _ in outbox:
            assert SeriesState.from_records(table[f"S:{name}"], table.get(f"S+:{name}")).outbox == []
            sent_and_written += 1
    assert len(spikes) > 5 and sent_and_written > 5  # the stream raises spikes, so the comparison means something
    assert held.regions.take_outbox() == []  # nothing left unsent
