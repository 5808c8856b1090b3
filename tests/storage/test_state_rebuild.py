"""A worker that rebuilt its state from ClickHouse raises, on the live reports after the history, the alerts of
a worker that saw the history itself (issue 11: a crash never changes the alerts).

The history goes into the real embedded engine with ``ingest-history`` (as `make demo` loads it); the rebuilt
detectors then take the live lines through the offline backtest's loop, and the one backtest over history and
live lines together is the reference: same alerts, same order, same content."""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from synthwatch.settings import Settings
from synthwatch.stack.demo import demo_streams
from synthwatch.stream_apps.detect.backtest import run_lines
from synthwatch.stream_apps.detect.identity import SubstanceResolver
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.region import DetectionConfig, Detector
from synthwatch.stream_apps.storage.backfill.ingest import ingest_history
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from synthwatch.stream_apps.storage.state_rebuild import rebuild
from tests.support.factories import lab, seizure
from tests.support.rebuilt import rebuilt_then_live

#: Longer than the spike series' memory (66 days) plus the replay's settling days, so the rebuild has to
#: restore what the replay window alone cannot (series dated before it, their older seizure masses), and with
#: a spread episode under way at the cut (Mephedrone for seed 7).
HISTORY_DAYS, LIVE_DAYS = 90, 14


def _numbered(lines: list[str], stream: str) -> list[tuple[str, str]]:
    return [(f"{stream}:0:{n}", line) for n, line in enumerate(lines)]


def _content(alerts: list[Any]) -> list[dict[str, Any]]:
    return [a.model_dump(exclude={"detected_at"}) for a in alerts]  # detected_at is the wall clock


def _report(n: int, region: str, day: int, reported_days: float = 1 / 24) -> str:
    occurred = datetime(2026, 1, 1, 10, tzinfo=UTC) + timedelta(days=day, minutes=n)
    reported = occurred + timedelta(days=reported_days)
    record = lab(
        event_id=f"rb-{n}",
        occurred_at=occurred.isoformat(),
        reported_at=reported.isoformat(),
        country=region[:2],
        region=region,
        substance={"name": "Protonitazene"},
        sample_id=f"S-{n}",
    )
    return json.dumps(record)


def test_a_spread_under_way_at_the_restart_is_not_announced_again(ch: Any) -> None:
    # Two regions report the substance daily for a month; a third on days 2 and 12: the spread holds from day 2
    # to day 25 (day 12 + 14 - 1). A fourth region on day 31 extends the same episode: no new spread alert.
    # Replayed from each region's first and last day only, the episode seemed to have ended on day 12.
    days = [("FR-75C", d) for d in range(31)] + [("ES-B", d) for d in range(1, 31)] + [("NL-NH", 2), ("NL-NH", 12)]
    history = [_report(n, region, day) for n, (region, day) in enumerate(sorted(days, key=lambda rd: rd[1]))]
    live = [_report(len(history), "DE-BE", 31)]
    whole = run_lines(_numbered(history + live, "h"), DetectionConfig.from_settings(Settings()))
    raised_by_history = len(run_lines(_numbered(history, "h"), DetectionConfig.from_settings(Settings())).alerts)
    expected = whole.alerts[raised_by_history:]
    assert [a.alert_type for a in expected] == ["first_in_region"]

    migrate(ch)
    result = Intake().process([RawMessage(f"h:0:{n}", line) for n, line in enumerate(history)])
    assert ClickHouseSink(ch).store_events(result.events).stored == len(history)
    assert _content(rebuilt_then_live(ch, _numbered(live, "l"))) == _content(expected)


@pytest.mark.slow  # ~15 s alone: two backtests of 100 days, a load and a rebuild
def test_rebuild_then_live_raises_the_alerts_of_one_backtest_over_everything(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    streams = demo_streams(HISTORY_DAYS, LIVE_DAYS, seed=7, end=date(2026, 12, 6))
    config = DetectionConfig.from_settings(Settings())
    history_alone = run_lines(_numbered(streams.history, "h"), config)
    whole = run_lines(_numbered(streams.history + streams.live, "h"), config)
    raised_by_history = len(history_alone.alerts)
    assert _content(whole.alerts[:raised_by_history]) == _content(history_alone.alerts)
    expected = whole.alerts[raised_by_history:]

    path = tmp_path / "history.ndjson"
    path.write_text("".join(line + "\n" for line in streams.history), encoding="utf-8")
    loaded = ingest_history(ch_settings, path, progress=False, workers=0, client=ch)
    assert loaded.stored > 0
    live = rebuilt_then_live(ch, _numbered(streams.live, "l"))

    kinds = Counter(a.alert_type for a in expected)
    assert set(kinds) == {"new_substance", "first_in_region", "spread", "spike"}, kinds  # every kind is at stake
    assert {a.metric for a in expected if a.alert_type == "spike"} == {"count", "quantity"}
    assert _content(live) == _content(expected)


def _pippp(
    event_id: str,
    day: float,
    region: str | None = None,
    structure: bool = False,
    lab_id: str = "LAB-FR-01",
    name: str = "3-Me-4-F-α-PipPP",
    smiles: str = "CC(N1CCCCC1)C(=O)c1ccc(F)c(C)c1",
) -> str:
    """A report of a substance the catalogue lacks: a lab's with its structure, else a seizure's by name only."""
    at = datetime(2026, 11, 29, 10, tzinfo=UTC) + timedelta(days=day)
    substance: dict[str, Any] = {"name": name}
    if structure:
        substance["smiles"] = smiles
        record = lab(event_id=event_id, occurred_at=at.isoformat(), substance=substance, lab_id=lab_id)
        record.update(sample_id=f"S-{event_id}")
        if region is not None:
            record.update(region=region, country=region[:2])
        return json.dumps(record, ensure_ascii=False)
    record = seizure(event_id=event_id, occurred_at=at.isoformat(), substance=substance, seizure_id=event_id)
    if region is not None:
        record.update(region=region, country=region[:2])
    return json.dumps(record, ensure_ascii=False)


def _restarted(
    ch: Any, reports: list[str], cut: int, corroboration: int
) -> tuple[Any, Detector, Detector, list[Any], list[Any]]:
    """One backtest over ``reports``, and detectors rebuilt from the first ``cut`` stored then given the rest:
    (whole run, its detector, the rebuilt detector, alerts expected after the cut, alerts after the rebuild)."""
    config = DetectionConfig.from_settings(Settings())
    saw = Detector(config)
    whole = run_lines(
        _numbered(reports, "h"), config, detector=saw, intake=Intake(SubstanceResolver(corroboration=corroboration))
    )
    before = run_lines(
        _numbered(reports[:cut], "h"), config, intake=Intake(SubstanceResolver(corroboration=corroboration))
    )
    migrate(ch)
    result = Intake(SubstanceResolver(corroboration=corroboration)).process(
        [RawMessage(f"h:0:{n}", line) for n, line in enumerate(reports[:cut])]
    )
    assert ClickHouseSink(ch).store_events(result.events).stored == cut
    intake, rebuilt = Intake(SubstanceResolver(corroboration=corroboration), stage="backtest"), Detector(config)
    rebuild(ch, rebuilt.regions, rebuilt.novelty, intake.resolver, intake.stored_reporter)
    live = run_lines(_numbered(reports[cut:], "l"), config, detector=rebuilt, intake=intake, stored=set())
    return whole, saw, rebuilt, whole.alerts[len(before.alerts) :], live.alerts


@pytest.mark.parametrize(
    ("corroboration", "cut"),
    [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)],
    ids=["c1-before-the-lab", "c1-after-the-lab", "c2-before-the-labs", "c2-between-the-labs", "c2-after-the-labs"],
)
def test_a_name_alerted_alone_is_identified_across_a_restart(ch: Any, corroboration: int, cut: int) -> None:
    """The name-only seizure, then (across a restart at ``cut``) the lab report(s) that settle its name, then more
    name-only seizures: the alerts of one backtest over everything (the structure a new_substance naming the
    name with corroboration 1, an info follow-up once a second lab settles it with 2; a first appearance in the
    region alerted under the name as in any other), and the same novelty record for the structure, byte for byte."""
    labs = [_pippp("lab-1", 1, structure=True)]
    if corroboration == 2:
        labs.append(_pippp("lab-2", 1.5, structure=True, lab_id="LAB-DE-09"))
    reports = [_pippp("sz-1", 0), *labs, _pippp("sz-2", 2), _pippp("sz-3", 3, "ML-1")]
    whole, saw, rebuilt, expected, live = _restarted(ch, reports, cut, corroboration)
    linked = {1: ["new_substance", "new_substance"], 2: ["new_substance", "new_substance", "identified"]}
    assert [(a.alert_type, a.region) for a in whole.alerts][len(linked[corroboration]) :] == [
        ("first_in_region", "ML-BKO"),
        ("first_in_region", "ML-1"),
        ("spread", None),
    ]
    assert [a.alert_type for a in whole.alerts][: len(linked[corroboration])] == linked[corroboration]
    assert [a.alert_type for a in live] == [a.alert_type for a in expected]
    assert _content(live) == _content(expected)
    key = whole.alerts[1].substance.key
    assert saw.novelty.state[key].names == ["name:3me4fαpippp"]
    assert json.dumps(rebuilt.novelty.state[key].to_dict()) == json.dumps(saw.novelty.state[key].to_dict())


def test_a_contested_name_links_nothing_across_a_restart(ch: Any) -> None:
    """Reviewer's probe (finding 2): a name bound by one lab and contested by another links nothing live, so the
    rebuilt record is the live one and a later report of the structure elsewhere raises the same alerts."""
    other = "CC(NC)C(=O)c1ccc(Cl)c(C)c1"
    reports = [
        _pippp("sz-1", 0),
        _pippp("lab-1", 1, structure=True),
        _pippp("lab-2", 2, structure=True, lab_id="LAB-FR-02", smiles=other),
        _pippp("lab-3", 3, "ML-BKO", structure=True, name="whatever"),
    ]
    whole, saw, rebuilt, expected, live = _restarted(ch, reports, 3, 2)
    assert [a.alert_type for a in whole.alerts] == ["new_substance"] * 3 + ["first_in_region"]
    assert _content(live) == _content(expected)
    key = whole.alerts[1].substance.key
    assert json.dumps(rebuilt.novelty.state[key].to_dict()) == json.dumps(saw.novelty.state[key].to_dict())


def test_names_tied_to_a_substance_are_in_the_same_order_after_a_rebuild(ch: Any) -> None:
    """Reviewer's probe (finding 7): two names tied to one structure, the later-sorted one first."""
    reports = [
        _pippp("sz-1", 0, name="Zeta-PipPP"),
        _pippp("sz-2", 0.1, name="Alpha-PipPP"),
        _pippp("lab-1", 1, structure=True, name="Zeta-PipPP"),
        _pippp("lab-2", 2, structure=True, name="Alpha-PipPP"),
    ]
    whole, saw, rebuilt, _expected, _live = _restarted(ch, reports, 4, 1)
    key = whole.alerts[2].substance.key
    assert saw.novelty.state[key].names == ["name:alphapippp", "name:zetapippp"]
    assert json.dumps(rebuilt.novelty.state[key].to_dict()) == json.dumps(saw.novelty.state[key].to_dict())


def test_a_name_reported_beyond_the_horizon_links_neither_live_nor_after_a_rebuild(ch: Any) -> None:
    """Finding 1/8: a name-only report older than the horizon before the lab's links nothing, live or rebuilt, and
    the structure's first report in that region is a first appearance on both."""
    reports = [
        _pippp("sz-1", -400),
        _pippp("lab-1", 1, structure=True),
        _pippp("lab-2", 2, "ML-BKO", structure=True, name="unknown powder"),
    ]
    for cut in (1, 2):
        whole, saw, rebuilt, expected, live = _restarted(ch, reports, cut, 1)
        assert [a.alert_type for a in whole.alerts] == ["new_substance", "new_substance", "first_in_region"]
        assert "name_key" not in whole.alerts[1].details
        assert _content(live) == _content(expected)
        key = whole.alerts[1].substance.key
        assert json.dumps(rebuilt.novelty.state[key].to_dict()) == json.dumps(saw.novelty.state[key].to_dict())
        ch.command("TRUNCATE TABLE lab_detections")
        ch.command("TRUNCATE TABLE border_seizures")


def test_a_report_sent_before_it_occurred_does_not_reorder_the_replay(ch: Any) -> None:
    # One report claims to have been sent ten days before it occurred. Replayed at that claim, it would move
    # the region's watermark ten days ahead and make the reports of those days late: out of the spike series.
    history = [_report(n, "FR-75C", day) for n, day in enumerate(range(41))]
    history.insert(36, _report(len(history), "FR-75C", 35, reported_days=-10))  # it arrived on its day
    config = DetectionConfig.from_settings(Settings())
    saw, rebuilt = Detector(config), Detector(config)
    assert run_lines(_numbered(history, "h"), config, detector=saw).summary.late == 0

    migrate(ch)
    result = Intake().process([RawMessage(f"h:0:{n}", line) for n, line in enumerate(history)])
    assert ClickHouseSink(ch).store_events(result.events).stored == len(history)
    rebuild(ch, rebuilt.regions, rebuilt.novelty, Intake().resolver)
    assert set(rebuilt.regions.series) == set(saw.regions.series)
    for name, state in saw.regions.series.items():
        assert sum(state.counts.values()) == len(history), name
        assert rebuilt.regions.series[name].counts == state.counts, name
    assert rebuilt.regions.regions["FR-75C"].totals == saw.regions.regions["FR-75C"].totals


def test_a_far_future_report_stored_before_the_bound_is_left_out_of_the_rebuilt_state(
    ch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Stored before the intake refused event times past their receipt (or by ingest-history): a report dated
    # 2099. Replayed, it was the resolver's watermark (every remembered name forgotten) and its region's newest
    # report (every later one late). It stays stored; the rebuilt state leaves it out, as the intake refuses it.
    from tests.detect.test_identified import LAB, NAME_KEY, SEIZURE

    history = [_report(n, "FR-75C", day) for n, day in enumerate(range(30))]
    history.append(json.dumps(SEIZURE))  # a name-only report the resolver remembers
    history.append(_report(99, "FR-75C", 29).replace("2026-01-30", "2099-01-30"))
    migrate(ch)
    result = Intake().process([RawMessage(f"h:0:{n}", line) for n, line in enumerate(history)])
    assert ClickHouseSink(ch).store_events(result.events).stored == len(history)

    config = DetectionConfig.from_settings(Settings())
    intake, detector = Intake(stage="backtest"), Detector(config)
    with caplog.at_level(logging.WARNING, logger="synthwatch.stack.worker"):
        report = rebuild(ch, detector.regions, detector.novelty, intake.resolver, intake.stored_reporter)
    # said, with an id: stored (every count of the tables holds it) but seen by no detector
    assert report.future_left_out == 1
    assert "1 stored reports are left out of the detector state" in caplog.text and "rb-99" in caplog.text
    live = [_report(100 + n, "FR-75C", 30 + n) for n in range(3)] + [json.dumps(LAB)]
    run = run_lines(_numbered(live, "l"), config, detector=detector, intake=intake, stored=set())
    assert run.summary.late == 0, "the region's later reports count as usual"
    linked = [a for a in run.alerts if a.alert_type == "new_substance"]
    assert linked[-1].details.get("name_key") == NAME_KEY, "the name remembered before the restart is linked"
    assert ch.query("SELECT count() FROM lab_detections WHERE occurred_at > '2090-01-01'").result_rows == [(1,)]


def _kind_report(n: int, kind: str, day: int, minute: int = 0) -> str:
    """A Tramadol report of ``kind`` from FR-75C on ``day``, sent an hour after it occurred."""
    occurred = datetime(2026, 1, 1, 10, tzinfo=UTC) + timedelta(days=day, minutes=minute)
    common: dict[str, Any] = {
        "event_id": f"k-{n}",
        "occurred_at": occurred.isoformat(),
        "reported_at": (occurred + timedelta(hours=1)).isoformat(),
        "country": "FR",
        "region": "FR-75C",
        "substance": {"name": "Tramadol"},
    }
    if kind == "lab_detection":
        return json.dumps(lab(**common, sample_id=f"S-{n}"))
    return json.dumps(seizure(**common, seizure_id=f"Z-{n}"))


def test_a_kind_silent_through_the_replay_window_holds_pruning_back_after_a_rebuild_as_it_did_live(ch: Any) -> None:
    # Seizures in the region's first 20 days only, labs every day for 140: the seizures' watermark (day 19) is older
    # than the rebuild's replay window (from day 45), so the rebuilt region had none and was pruned as of the labs'
    # day, while the worker that saw the history (its seizure watermark 14+ days behind) pruned 14 days behind it.
    # Live: labs of days 140-146, then a seizure surge of day 140 read after them: rebuilt, its baseline had lost
    # days the one backtest kept: 0.9453 expected instead of 1.0078 (7 reports in a day).
    history: list[str] = []
    for day in range(140):
        for k in range(1 + (day % 7 == 1)):
            history.append(_kind_report(len(history), "lab_detection", day, k))
        if day < 20:
            history.append(_kind_report(len(history), "border_seizure", day, 30))
    live = [_kind_report(1000 + day, "lab_detection", day) for day in range(140, 147)]
    live += [_kind_report(2000 + k, "border_seizure", 140, 60 + k) for k in range(9)]
    config = DetectionConfig.from_settings(Settings())
    whole = run_lines(_numbered(history + live, "h"), config)
    expected = whole.alerts[len(run_lines(_numbered(history, "h"), config).alerts) :]
    assert [a.alert_type for a in expected] == ["spike", "spike"]  # Tramadol and its family

    migrate(ch)
    result = Intake().process([RawMessage(f"h:0:{n}", line) for n, line in enumerate(history)])
    assert ClickHouseSink(ch).store_events(result.events).stored == len(history)
    assert _content(rebuilt_then_live(ch, _numbered(live, "l"))) == _content(expected)
