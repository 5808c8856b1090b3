"""A worker killed mid-checkpoint and restarted raises exactly the alerts of one that never died (pure model).

The model is the worker's order of things, without Faust: the region stage takes input events in batches
and sends alerts and sightings at once; the novelty stage takes the sightings; at a checkpoint each
stage writes its changed records (region stage: series first, then regions, all on the region's
partition) and only then are offsets committed. A SIGKILL during a checkpoint leaves a prefix of its
records written, and the committed offsets lag the written state by up to a few checkpoints (Faust
commits once a second). The restarted stages read the records back (JSON, as from the changelog) and
replay from the committed offsets. The alerts sent before the kill and after the restart must be the
live run's, id for id and field for field, and the final state the same.

The model has a store and a clock too: the intake's reports are stored at each checkpoint (a re-sent one is not
stored again), each sightings message carries the time it was sent, and a new-substance alert names the learnt
structures stored by then (its cut), as the worker does (stream_apps/runtime/agents/novelty.py). The replay
computes those alerts again later, when more is stored; the cut keeps them the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache
from typing import Any

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from pydantic_core import from_json, to_json

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from synthwatch.stream_apps.detect.region import Observation, RegionDetector
from synthwatch.stream_apps.detect.replay import Position, applied, apply_once, note, position_of
from synthwatch.stream_apps.detect.similarity import LearntStructure


@cache
def stream() -> list[tuple[Observation, Position]]:
    """A simulated stream (spikes, late reports, re-sent events) with each event's position on its topic."""
    sim = simulate(SimulationConfig(days=60, seed=17, start=date(2026, 1, 1), warmup_days=30, events_per_day=150))
    intake = Intake(stage="backtest")
    items = [Observation.of(e) for e in intake.process(RawMessage(f"s:{i}", x) for i, x in enumerate(sim.lines)).events]
    offsets: dict[str, int] = {}
    out = []
    for item in items:
        where = f"{item.kind}s:0"
        offsets[where] = offsets.get(where, -1) + 1
        out.append((item, (where, offsets[where])))
    return out


def json_table(records: list[tuple[str, Any]], table: dict[str, bytes]) -> None:
    for key, value in records:
        table[key] = to_json(value)


def reader(table: dict[str, bytes]) -> Any:
    return lambda key: from_json(table[key]) if key in table else None


@dataclass
class Run:
    """Both stages over one table each and one sightings log; ``sent``: alert id -> alert (content)."""

    regions_table: dict[str, bytes] = field(default_factory=dict)
    novelty_table: dict[str, bytes] = field(default_factory=dict)
    sightings: list[list[Sighting]] = field(default_factory=list)  # the sightings topic (one partition)
    sent: dict[str, str] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    skipped: int = 0  # sightings the novelty stage found in its records already
    stamps: list[int] = field(default_factory=list)  # per sightings message: the clock when it was sent
    stored: dict[str, tuple[int, LearntStructure | None]] = field(default_factory=dict)  # event id -> when, what
    clock: int = 0  # the wall clock: it moves on with each batch and each checkpoint, in a replay too
    killed_at: int | None = None  # the clock when the worker was killed
    sections: dict[str, tuple[Any, Sighting, int]] = field(default_factory=dict)  # alert id -> (alert, sighting, cut)

    def store(self, observations: list[Observation]) -> None:
        """The intake sink at a checkpoint: reports not stored yet, stamped with the store's clock."""
        self.clock += 1  # after the batches it holds: an insert is never seen by a cut before it
        for obs in observations:
            if obs.event_id not in self.stored:
                learnt = LearntStructure(obs.subject.key, obs.subject.name, obs.smiles, None) if obs.smiles else None
                self.stored[obs.event_id] = (self.clock, learnt)

    def learnt_by(self, cut: int) -> list[LearntStructure]:
        """The structures whose first report was stored at or before ``cut`` (storage/learnt.py's question)."""
        first: dict[str, tuple[int, str, LearntStructure]] = {}
        for event_id, (at, learnt) in self.stored.items():
            if learnt is not None and at <= cut:
                known = first.get(learnt.key)
                if known is None or (at, event_id) < known[:2]:
                    first[learnt.key] = (at, event_id, learnt)
        return [learnt for _, _, learnt in first.values()]

    def with_learnt(self, novelty: NoveltyDetector, alerts: list[Any], raised: dict[Any, Any]) -> list[Any]:
        """New-substance alerts with their learnt section, each read at its sightings message's cut."""
        out = []
        for alert in alerts:
            found = raised.get((alert.substance.key, alert.evidence_event_ids[0]))
            if alert.alert_type == "new_substance" and found is not None:
                sighting, cut = found
                self.sections.setdefault(alert.alert_id, (alert, sighting, cut))
                alert = novelty.with_learnt(alert, sighting, self.learnt_by(cut), datetime.fromtimestamp(cut, UTC))
            out.append(alert)
        return out

    def send(self, alerts: list[Any]) -> None:
        for alert in alerts:
            content = alert.model_dump_json(exclude={"detected_at"})  # detected_at: the wall clock
            if self.sent.setdefault(alert.alert_id, content) != content:
                self.conflicts.append(alert.alert_id)

    def go(
        self,
        start: int,
        sightings_start: int,
        batch: int,
        every: int,
        kill: tuple[int, float, float, int] | None = None,
    ) -> tuple[int, int]:
        """Process the stream from ``start`` (sightings from ``sightings_start``); returns the committed
        positions (input index, sightings index). ``kill`` = (checkpoint, share of its region records
        written, share of its substance records written, checkpoints the committed offsets lag behind):
        stop there."""
        regions = RegionDetector(fetch=reader(self.regions_table))
        novelty = NoveltyDetector(fetch=reader(self.novelty_table))
        items = stream()
        done, read = start, sightings_start
        commits: list[tuple[int, int]] = [(start, sightings_start)]
        checkpoint = 0
        held: list[Observation] = []  # the events taken since the last checkpoint: the intake stores them there
        while done < len(items):
            for _ in range(every):
                chunk, done = items[done : done + batch], min(len(items), done + batch)
                sent: list[Sighting] = []
                self.clock += 1
                held.extend(obs for obs, _ in chunk)
                for obs, at in chunk:
                    found = regions.observe(obs, at=at)
                    self.send(found.alerts)
                    sent.extend(found.sightings)
                # As the worker: one message per substance, in event-time order.
                messages: dict[str, list[Sighting]] = {}
                for sighting in sorted(sent, key=lambda s: (s.occurred_at, s.event_id)):
                    messages.setdefault(sighting.key, []).append(sighting)
                self.sightings.extend(messages.values())
                self.stamps.extend(self.clock for _ in messages)
                new = [(s, ("sightings:0", read + i)) for i, m in enumerate(self.sightings[read:]) for s in m]
                raised: dict[tuple[str, str], tuple[Sighting, int]] = {}
                for i, m in enumerate(self.sightings[read:]):  # the first message with a sighting raised it
                    for s in m:
                        raised.setdefault((s.key, s.event_id), (s, self.stamps[read + i]))
                alerts, taken = novelty.observe_batch(new)
                self.skipped += len(new) - taken
                self.send(self.with_learnt(novelty, alerts, raised))
                read = len(self.sightings)
                if done >= len(items):
                    break
            region_records = [(key, value) for _, key, value in regions.drain_dirty()]
            substance_records = novelty.drain_dirty()
            checkpoint += 1
            if kill is not None and checkpoint == kill[0]:
                self.killed_at = self.clock
                self.store(held[: int(len(held) * kill[1])])  # the intake's rows: a prefix, like the records
                json_table(region_records[: int(len(region_records) * kill[1])], self.regions_table)
                json_table(substance_records[: int(len(substance_records) * kill[2])], self.novelty_table)
                return commits[max(0, len(commits) - 1 - kill[3])]
            self.store(held)
            held = []
            json_table(region_records, self.regions_table)
            json_table(substance_records, self.novelty_table)
            commits.append((done, read))
        return commits[-1]


def state_of(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the tables hold, read back as the detectors read it (records differ in full/delta bookkeeping)."""
    regions = RegionDetector(fetch=reader(run.regions_table))
    found: dict[str, Any] = {}
    for key in run.regions_table:
        kind, name = key.split(":", 1)
        if kind == "R":
            r = regions.region_state(name)
            found[key] = (r.watermarks, r.recent, r.forwarded, r.totals, r.first_day, r.rhythm, r.applied)
        elif kind == "S":
            s = regions.series_state(*name.split("|", 1), day=10**6)[1]
            found[key] = (s.counts, s.grams, s.masses, s.evidence, s.episodes, s.first_day, s.applied)
    # Without the sightings' offsets: a re-sent sighting takes an offset of its own on the topic.
    return found, {k: {**from_json(v), "a": None} for k, v in run.novelty_table.items()}


@cache
def live(batch: int, every: int) -> Run:
    run = Run()
    run.go(0, 0, batch, every)
    return run


def test_positions_of_kafka_sources_and_marks() -> None:
    assert position_of("labs-x:3:1234") == ("labs-x:3", 1234)
    assert position_of("a:b:c:7:0") == ("a:b:c:7", 0)
    assert position_of("sim:12") is None  # a file line (backtest): no position, nothing skipped
    assert position_of("labs:3:x") is None
    marks: dict[str, int] = {}
    assert not applied(marks, ("t:0", 5)) and not applied(marks, None)
    assert apply_once(marks, ("t:0", 5)) and marks == {"t:0": 5}
    assert not apply_once(marks, ("t:0", 5)) and not apply_once(marks, ("t:0", 2))
    assert apply_once(marks, ("t:1", 0)) and apply_once(marks, None)  # another partition; no position
    note(marks, ("t:0", 3))  # never moves back
    assert marks == {"t:0": 5, "t:1": 0}


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    batch=st.sampled_from([40, 300]),
    every=st.sampled_from([1, 3]),
    at=st.floats(0.05, 0.95),
    region_written=st.floats(0.0, 1.0),
    substances_written=st.floats(0.0, 1.0),
    lag=st.integers(0, 3),
)
# Found by a fresh-clone run: a new-substance alert replayed after the kill listed other nearest structures (the
# killed worker had learnt structures the restarted one had not met). Alerts now rank against the catalogue.
@example(
    batch=40, every=1, at=0.9499999999999998, region_written=2.7e-38, substances_written=0.08523146487493306, lag=3
)
def test_a_worker_killed_mid_checkpoint_sends_the_live_alerts_after_replay(
    batch: int, every: int, at: float, region_written: float, substances_written: float, lag: int
) -> None:
    expected = live(batch, every)
    checkpoints = len(stream()) // (batch * every)
    kill_at = max(1, int(checkpoints * at))
    # What of the killed checkpoint reached the broker: a prefix of its records, in the order they were sent.
    kill = (kill_at, region_written, substances_written, lag)

    crashed = Run()
    start, sightings_start = crashed.go(0, 0, batch, every, kill=kill)
    crashed.go(start, sightings_start, batch, every)

    assert not crashed.conflicts, "an alert id was sent again with other content"
    # A new-substance alert names the learnt structures stored by its cut: the time its sightings message was sent.
    # One sent before the kill is sent again after it from the same message (same cut): the same, to the field.
    # One whose message came after the kill was raised later than in the run without one: its cut is later (the
    # alert says as of when), and its section is what the store held by then; everything else is the live one's.
    assert crashed.killed_at is not None
    late = {alert_id for alert_id, (_, _, cut) in crashed.sections.items() if cut > crashed.killed_at}
    assert {k: v for k, v in crashed.sent.items() if k not in late} == {
        k: v for k, v in expected.sent.items() if k not in late
    }
    assert set(crashed.sent) == set(expected.sent)
    for alert_id in late:
        assert from_json(crashed.sent[alert_id]) | {"learnt_substances": None} == from_json(expected.sent[alert_id]) | {
            "learnt_substances": None
        }
        alert, sighting, cut = crashed.sections[alert_id]
        again = NoveltyDetector().with_learnt(alert, sighting, crashed.learnt_by(cut), datetime.fromtimestamp(cut, UTC))
        assert contents([again]) == [crashed.sent[alert_id]]  # read again at its cut, later: the same
    assert state_of(crashed) == state_of(expected)
    assert len(expected.sent) > 100  # alerts of every kind: the comparison means something
    learnt = [a for a in map(from_json, expected.sent.values()) if (a.get("learnt_substances") or {}).get("substances")]
    assert learnt, "some new substance names a learnt structure: the learnt sections are compared too"
    assert expected.skipped == 0  # a run without a kill reads nothing twice


def test_series_records_written_without_their_region_record_take_each_event_once() -> None:
    """A kill between a checkpoint's series records and its region record (sent last, on the same
    partition, so never the other way round): the replay meets series that hold its events next to a
    region that does not. With positions each series takes each event once; without, twice."""
    items = stream()
    head, tail = items[:3000], items[3000:3400]
    for positions in (True, False):
        table: dict[str, bytes] = {}
        regions = RegionDetector(fetch=reader(table))
        for obs, at in head:
            regions.observe(obs, at=at if positions else None)
        json_table([(k, v) for _, k, v in regions.drain_dirty()], table)
        live_run = RegionDetector(fetch=reader(dict(table)))
        for obs, at in tail:
            live_run.observe(obs, at=at if positions else None)
        for obs, at in tail[:200]:
            regions.observe(obs, at=at if positions else None)
        records = regions.drain_dirty()
        kinds = [key.split(":", 1)[0].rstrip("+") for _, key, _ in records]
        assert kinds == sorted(kinds, reverse=True), "series records are sent before region records"
        json_table([(k, v) for _, k, v in records if k.startswith("S")], table)  # the kill: no region record
        replayed = RegionDetector(fetch=reader(table))
        for obs, at in tail:  # the committed offset is before the lost checkpoint
            replayed.observe(obs, at=at if positions else None)
        same = all(
            (got.counts, got.evidence) == (s.counts, s.evidence)
            for n, s in live_run.series.items()
            for got in [replayed.series_state(*n.split("|", 1), day=10**6)[1]]
        )
        assert same is positions, "with positions the replay is exact; without, a series counts events twice"


def test_a_sighting_sent_again_changes_nothing() -> None:
    """The region stage re-sends a sighting when its record was lost in a crash; novelty takes it once."""
    items = stream()
    regions, once, twice = RegionDetector(), NoveltyDetector(), NoveltyDetector()
    sightings = [s for obs, _ in items[:4000] for s in regions.observe(obs).sightings]
    for i, sighting in enumerate(sightings):
        assert contents(once.observe(sighting)) == contents(twice.observe(sighting))
        # each sighting again, a little later (after the sightings that followed it)
        if i >= 5:
            assert twice.observe(sightings[i - 5]) == []
    assert {k: v.to_dict() for k, v in once.state.items()} == {k: v.to_dict() for k, v in twice.state.items()}


@pytest.mark.parametrize("horizon", [1, 31])
def test_sighted_days_are_remembered_within_the_horizon(horizon: int) -> None:
    novelty = NoveltyDetector()
    novelty.config = novelty.config.model_copy(update={"resent_days": horizon})
    base = stream()[0][0].sighting()
    for day in (10, 12, 11, 40):
        novelty.observe(_on_day(base, day))
    state = novelty.state[base.key]
    assert state.sighted(base.region, 40, horizon)
    assert state.sighted(base.region, 12, horizon) is (horizon > 28)
    assert not state.sighted(base.region, 13, horizon) and not state.sighted(base.region, 41, horizon)


def contents(alerts: list[Any]) -> list[str]:
    return [a.model_dump_json(exclude={"detected_at"}) for a in alerts]  # detected_at: the wall clock


def _on_day(sighting: Sighting, day: int) -> Sighting:
    data = sighting.to_dict()
    data["day"] = day
    return Sighting.from_dict(data)
