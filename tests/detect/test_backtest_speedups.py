"""The backtest's speed-ups change nothing: the helper process filling the structure cache ahead of the
reader gives the same alerts, rejects and counts as resolving every structure inline."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from datetime import UTC, date, datetime
from typing import Any

import pytest

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.stream_apps.detect import backtest, identity
from synthwatch.stream_apps.detect.backtest import BacktestRun, run_lines
from synthwatch.stream_apps.detect.region import ObservationFields


def _comparable(run: BacktestRun) -> tuple[Any, ...]:
    """Everything a run produced except wall-clock stamps and its duration."""
    alerts = [a.model_dump(mode="json", exclude={"detected_at"}) for a in run.alerts]
    rejects = [r.model_dump(mode="json", exclude={"rejected_at"}) for r in run.rejects]
    counts = {**vars(run.summary), "seconds": None}
    return alerts, rejects, counts


def test_structures_computed_ahead_in_a_helper_process_give_the_same_run(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = simulate(SimulationConfig(days=45, seed=3, start=date(2026, 1, 1)))
    lines = [(f"sim:{i}", line) for i, line in enumerate(sim.lines)]
    assert sum('"smiles"' in line for _, line in lines) > 1000

    monkeypatch.setattr(backtest, "_BLOCK_LINES", len(lines) + 1)  # one block: no helper process
    monkeypatch.setattr(identity, "_BY_SPELLING", {})
    inline = run_lines(lines)

    monkeypatch.setattr(backtest, "_BLOCK_LINES", 500)  # many blocks: the helper runs a block ahead
    monkeypatch.setattr(backtest, "_FIRST_BLOCK_LINES", 150)  # the first one in two parts, as with 1,024 of 4,096
    monkeypatch.setattr(identity, "_BY_SPELLING", {})
    helped = run_lines(iter(lines))
    assert len(identity._BY_SPELLING) > 100  # the cache was filled, by the helper's answers among others

    assert _comparable(helped) == _comparable(inline)
    assert helped.summary.lines == len(lines) and helped.alerts


_SEPARATE = """
import json, sys
from datetime import date
from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.stream_apps.detect import backtest
started = []
real = backtest._DetectionProcess
backtest._DetectionProcess = lambda config, progress=None: started.append(config) or real(config, progress)
backtest._BLOCK_LINES = 700  # many blocks, more than _IN_FLIGHT waiting at once
backtest._FIRST_BLOCK_LINES = 250  # a short first block, as 1,024 of 4,096
sim = simulate(SimulationConfig(days=30, seed=4, start=date(2026, 1, 1)))
reported = []
lines = [(f"sim:{i}", line) for i, line in enumerate(sim.lines)] + [("sim:end", "{not json")]
run = backtest.run_lines(lines[:-1], progress=reported.append)  # (same run as without progress)
alerts = [a.model_dump(mode="json", exclude={"detected_at"}) for a in run.alerts]
rejects = [r.model_dump(mode="json", exclude={"rejected_at"}) for r in run.rejects]
counts = {**vars(run.summary), "seconds": None}
tail = []  # a last line that is malformed: its progress comes with an empty last block
backtest.run_lines(lines, progress=tail.append)
json.dump({"started": len(started), "run": [alerts, rejects, counts], "progress": [reported, tail]}, sys.stdout)
"""


def test_detecting_in_a_second_process_gives_the_run_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader hands numbered blocks of observations to a detection process: same alerts, rejects, counts.

    The separate run is made in a fresh interpreter: this one may hold the embedded engine from an earlier
    test, and then the backtest detects in-process (it forks only without it).
    """
    done = subprocess.run([sys.executable, "-c", _SEPARATE], capture_output=True, text=True, check=True, timeout=240)
    separate = json.loads(done.stdout)
    assert separate["started"] == 2  # both streams went to the detection process
    # progress: one advance per block once it is detected (not every 2,048 lines read), counting the block's
    # observations and the malformed lines among them; they add up to the lines
    reported, tail = separate["progress"]
    # blocks end where the helper's do (250, 700, 1,400, ...): the second is the first helper block's other 450 lines
    assert reported[0] >= 250 and 450 <= reported[1] < 500 and all(700 <= r < 750 for r in reported[2:-1])
    assert sum(reported) == separate["run"][2]["lines"]
    assert sum(tail) == sum(reported) + 1 and tail[-1] <= 700

    sim = simulate(SimulationConfig(days=30, seed=4, start=date(2026, 1, 1)))
    monkeypatch.setattr(backtest, "_BLOCK_LINES", 700)
    monkeypatch.setattr(backtest, "_FIRST_BLOCK_LINES", 250)
    monkeypatch.setattr(backtest, "_fork_is_safe", lambda: False)  # as with the engine loaded: detect here
    inline_reported: list[int] = []
    inline = run_lines([(f"sim:{i}", line) for i, line in enumerate(sim.lines)], progress=inline_reported.append)
    assert json.loads(json.dumps(list(_comparable(inline)))) == separate["run"]
    assert inline_reported == reported  # the same blocks, reported as each is detected here
    assert inline.summary.events > 5000 and inline.summary.duplicates and inline.alerts


def test_a_detection_block_out_of_order_is_refused() -> None:
    """Blocks are numbered: one arriving early would change the alerts, so it is an error, never a reordering."""
    backtest._start_detection(None)
    try:
        assert backtest._detect_block(0, []).events == 0
        with pytest.raises(RuntimeError, match="block 2 arrived before block 1"):
            backtest._detect_block(2, [])
    finally:
        backtest._DETECTION.clear()
        gc.enable()  # _start_detection turns the collector off for the process it runs in


def test_observations_share_offsets_and_strings_without_changing_a_value() -> None:
    """Observation.fields_of gives equal times with one tzinfo object per UTC offset, and one object per distinct
    code and name: the same instants, written the same way, and the same strings (only fewer objects)."""
    from synthwatch.schemas import parse_event
    from synthwatch.stream_apps.detect.intake import Intake
    from synthwatch.stream_apps.detect.region import Observation
    from tests.support.factories import lab, seizure

    intake = Intake(stage="backtest")
    records = [
        lab(event_id="a", occurred_at="2026-03-01T10:00:00+01:00"),
        lab(event_id="b", occurred_at="2026-03-01T12:30:00+01:00"),
        seizure(event_id="c", occurred_at="2026-03-01T09:00:00Z"),
        seizure(event_id="d", occurred_at="2026-03-01T23:59:59-05:00"),
        seizure(event_id="e", occurred_at="2026-03-02T01:00:00-05:00"),
    ]
    events = [parse_event(json.dumps(record)) for record in records]
    fields = [Observation.fields_of(intake.enrich(event, "test")) for event in events]
    for event, got in zip(events, fields, strict=True):
        assert got[2] == event.occurred_at and got[2].utcoffset() == event.occurred_at.utcoffset()
        assert got[2].isoformat() == event.occurred_at.isoformat()
        assert (got[1], got[4], got[5]) == (event.kind, event.country, event.region)
    assert fields[0][2].tzinfo is fields[1][2].tzinfo and fields[3][2].tzinfo is fields[4][2].tzinfo
    assert fields[0][2].tzinfo is not fields[2][2].tzinfo  # another offset, another object
    assert fields[0][4] is fields[1][4] and fields[0][10] is fields[1][10]  # country, lab: one object each


def test_progress_advances_only_for_blocks_detected_not_for_failed_or_cancelled_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A block cancelled at a shutdown (Ctrl-C) made the callback raise from ``exception()``, logged by the
    pool as an error; a failed block must not count as done either."""
    from concurrent.futures import Future

    advanced: list[int] = []
    detected: Future[Any] = Future()
    failed: Future[Any] = Future()
    cancelled: Future[Any] = Future()
    for future in (detected, failed, cancelled):
        future.add_done_callback(backtest._advance_when_detected(advanced.append, 700))
    detected.set_result(None)
    failed.set_exception(RuntimeError("the detection process died"))
    assert cancelled.cancel()
    assert advanced == [700]
    assert not [r for r in caplog.records if "exception calling callback" in r.getMessage()]


def test_observations_built_from_fields_in_the_compiled_core_are_those_of_the_constructor() -> None:
    """Observation.all_from (the detection process's blocks) gives Observation(*fields) for each, field for field."""
    from synthwatch.stream_apps.detect.alerting import Subject
    from synthwatch.stream_apps.detect.region import Observation

    subject = Subject(key="inchikey:X", name="x", inchikey="X", family="f", controlled=True, catalogued=False)
    moment = datetime(2026, 3, 1, 10, tzinfo=UTC)
    day = 20513
    block: list[ObservationFields] = [
        ("e1", "lab", moment, day, "FR", "FR-75", subject, None, "gc-ms", "powder", "lab-1", "CCO"),
        ("e2", "seizure", moment, day + 1, "DE", "DE-BE", subject, 12.5, None, None, "agency", None),
    ]
    built = Observation.all_from(block)
    assert built == [Observation(*fields) for fields in block]
    assert [[getattr(o, name) for name in _OBSERVATION_FIELDS] for o in built] == [list(f) for f in block]


_OBSERVATION_FIELDS = (
    "event_id",
    "kind",
    "occurred_at",
    "day",
    "country",
    "region",
    "subject",
    "grams",
    "method",
    "sample_type",
    "reporter",
    "smiles",
)


def test_a_sighting_built_positionally_has_every_field_the_keywords_give() -> None:
    """Observation.sighting passes Sighting's fields by position: each value must land in its own field (the
    keywords it replaced are the reference), every field set to a value of its own."""
    from dataclasses import replace

    from synthwatch.schemas.topics import Sighting
    from synthwatch.stream_apps.detect.alerting import Subject
    from synthwatch.stream_apps.detect.region import Observation

    subject = Subject(
        key="inchikey:K",
        name="name",
        inchikey="K",
        family="family",
        controlled=False,
        catalogued=True,
        identified_by="structure",
        formerly="name:old",
        formerly_regions=("FR-75", "DE-BE"),
        formerly_since="2026-01-02",
    )
    moment = datetime(2026, 3, 1, 10, tzinfo=UTC)
    obs = Observation("e1", "lab", moment, 20513, "FR", "FR-69", subject, 3.5, "gc-ms", "powder", "lab-1", "CCO")
    expected = Sighting(
        event_id="e1",
        kind="lab",
        occurred_at=moment,
        day=20513,
        country="FR",
        region="FR-69",
        key="inchikey:K",
        name="name",
        inchikey="K",
        family="family",
        controlled=False,
        catalogued=True,
        method="gc-ms",
        sample_type="powder",
        late_by_hours=7.25,
        identified_by="structure",
        reporter="lab-1",
        smiles="CCO",
        formerly="name:old",
        formerly_regions=["FR-75", "DE-BE"],
        formerly_since="2026-01-02",
    )
    assert obs.sighting(7.25) == expected
    # Identified by name, never named otherwise: no structure, no former name's regions.
    obs.subject = replace(subject, identified_by="name", formerly=None)
    assert obs.sighting() == replace(
        expected, late_by_hours=None, identified_by="name", smiles=None, formerly=None, formerly_regions=None
    )


def test_observation_times_carry_a_datetime_timezone_of_their_offset() -> None:
    """Observation.fields_from gives each time a datetime.timezone of its offset (timezone.utc for UTC, the epoch's):
    the detectors' comparisons and day numbers ask it for the offset in C, not pydantic-core's TzInfo through a Python
    call. The same instants, offsets, ISO texts and day numbers as the parsed times."""
    from datetime import timezone

    from synthwatch.schemas import parse_event
    from synthwatch.stream_apps.detect.alerting import day_of
    from synthwatch.stream_apps.detect.intake import Intake
    from synthwatch.stream_apps.detect.region import Observation
    from tests.support.factories import lab, seizure

    intake = Intake(stage="backtest")
    records = [
        lab(event_id="a", occurred_at="2026-03-01T23:30:00+01:00"),
        seizure(event_id="b", occurred_at="2026-03-01T09:00:00Z"),
        seizure(event_id="c", occurred_at="2026-03-01T23:59:59-05:00"),
        lab(event_id="d", occurred_at="2026-03-01T00:15:00+05:45"),
    ]
    events = [parse_event(json.dumps(record)) for record in records]
    for event in events:
        moment = Observation.fields_of(intake.enrich(event, "test"))[2]
        assert type(moment.tzinfo) is timezone and moment.utcoffset() == event.occurred_at.utcoffset()
        assert moment == event.occurred_at and moment.isoformat() == event.occurred_at.isoformat()
        assert day_of(moment) == day_of(event.occurred_at)
    assert Observation.fields_of(intake.enrich(events[1], "test"))[2].tzinfo is UTC
