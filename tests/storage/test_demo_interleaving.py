"""`make demo`'s spike alerts, whichever of its two topics the worker reads ahead (no broker: the demo's live lines
through detectors rebuilt from its history in ClickHouse, as the worker gets them, in two interleavings that each
keep every kind in its own order). One run of 15 raised 22 spike alerts instead of 21: a region's state was pruned
as of the kind read furthest, so a seizure read after days of lab reports lost the first days of its baseline. One run
of 5 raised 5 spread alerts instead of 4 (not reproduced here: how far one topic ran ahead is not known); read ahead,
the spread test of a late report counted the regions' spans, not their reports in the window."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from synthwatch.settings import Settings
from synthwatch.stack.demo import demo_streams
from synthwatch.stream_apps.storage.backfill.ingest import ingest_history
from tests.support.rebuilt import rebuilt_then_live

Lines = list[tuple[int, str]]


def _kind(line: str) -> str:
    try:
        return str(json.loads(line).get("kind"))
    except ValueError:
        return "malformed"


def _labs_behind(live: Lines, hours: float) -> Lines:
    """Both topics in arrival (``reported_at``) order, the labs read ``hours`` behind the seizures."""
    keyed, last = [], datetime.min.replace(tzinfo=UTC)
    for n, line in live:
        try:
            record = json.loads(line)
            last = datetime.fromisoformat(record["reported_at"])
        except (ValueError, KeyError):
            record = {}
        lag = timedelta(hours=hours) if record.get("kind") != "border_seizure" else timedelta(0)
        keyed.append((last + lag, n, line))
    return [(n, line) for _, n, line in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _labs_ahead(live: Lines, block: int) -> Lines:
    """``block`` lab lines, then ``block`` seizure lines, and so on (a fetch of each topic in turn)."""
    labs = [x for x in live if _kind(x[1]) != "border_seizure"]
    seizures = [x for x in live if _kind(x[1]) == "border_seizure"]
    order: Lines = []
    for start in range(0, max(len(labs), len(seizures)), block):
        order += labs[start : start + block] + seizures[start : start + block]
    return order


def _alerts(client: Any, order: Lines, kind: str = "spike") -> list[Any]:
    alerts = rebuilt_then_live(client, [(f"l:0:{n}", line) for n, line in order])
    return [a for a in alerts if a.alert_type == kind]


@pytest.mark.slow
def test_the_demo_raises_the_same_spikes_and_spreads_whichever_topic_is_read_ahead(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    streams = demo_streams(180, 21, seed=7, end=date(2026, 12, 7))  # the 15 runs' days: live from 2026-11-16
    path = tmp_path / "history.ndjson"
    path.write_text("".join(line + "\n" for line in streams.history), encoding="utf-8")
    assert ingest_history(ch_settings, path, progress=False, workers=0, client=ch).stored > 0
    live = list(enumerate(streams.live))

    usual = _alerts(ch, _labs_behind(live, 24))  # the 14 runs' alerts: MA-TNG methadone at 12-01 14:20
    labs_ahead = _alerts(ch, _labs_ahead(live, 1000))
    assert len(usual) == 21
    assert sorted(a.alert_id for a in labs_ahead) == sorted(a.alert_id for a in usual)  # was NG-LA codeine more

    # One window, one expected value, whichever report crossed it (its time still differs: docs/detection.md).
    fewer_ahead = _alerts(ch, _labs_behind(live, 20))  # the 15th run's methadone: 2026-12-02 13:36 UTC
    methadone = [[a for a in run if a.region == "MA-TNG"] for run in (usual, fewer_ahead)]
    assert [[(a.alert_id, a.expected) for a in run] for run in methadone] == [
        [("170513f14b771fefe09c7e61", 4.6495)]
    ] * 2
    assert [run[0].triggered_at.astimezone(UTC).isoformat() for run in methadone] == [
        "2026-12-01T14:20:30+00:00",
        "2026-12-02T13:36:36+00:00",
    ]

    # Spreads: the same episodes (alert ids: substance and the first day the window held), whichever topic is read
    # ahead, but one. Read 1,000 lines ahead, Etonitazepyne's lab of 11-24 arrived after SN-DK's report of 11-26,
    # and was tested on its own day only: its alert was dated 11-24 (another id). Methoxetamine's NG-LA lab of
    # 11-19 read before the same region's seizure of 11-16 still opens an episode (16 days after the last window
    # known to hold, 11-03) that the seizure, read in time, continues: a report read later cannot take an alert back.
    spreads = [
        {a.alert_id: a.substance.name for a in _alerts(ch, order, "spread")}
        for order in (_labs_behind(live, 24), _labs_ahead(live, 1000))
    ]
    assert len(spreads[0]) == 4
    assert {k: v for k, v in spreads[1].items() if k not in spreads[0]} == {"c43f194da4df607e12d1847a": "Methoxetamine"}
    assert spreads[0].items() <= spreads[1].items()
