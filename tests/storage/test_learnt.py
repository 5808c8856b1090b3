"""The structures the network learnt, as of a stored-before cut, on the real embedded engine (issue 16).

What a new-substance alert names as learnt must be the same when a replay asks again later: the rows stored at
or before the cut do not change when more reports are stored, or when a report is sent again.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.learnt import learnt_structures
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.conftest import wait_until
from tests.support.factories import lab, seizure

PROTONITAZEPYNE = "CCCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"
ISOTONITAZEPYNE = "CC(C)Oc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN2CCCC2)cc1"


def _store(sink: ClickHouseSink, records: list[dict[str, Any]]) -> int:
    messages = [RawMessage(f"t:0:{r['event_id']}", json.dumps(r)) for r in records]
    return sink.store_events(Intake().process(messages).events).stored


def _newest_stored(ch: Any) -> datetime:
    """The latest ``ingested_at`` stored: a cut that takes everything stored so far."""
    rows = ch.query(
        "SELECT max(t) FROM (SELECT max(ingested_at) AS t FROM lab_detections "
        "UNION ALL SELECT max(ingested_at) AS t FROM border_seizures)"
    ).result_rows
    stamp: datetime = rows[0][0]
    return stamp


def _wait_past(ch: Any, cut: datetime) -> None:
    """Until the engine's clock is past ``cut`` (millisecond resolution): what is stored next comes after it."""
    wait_until(lambda: ch.query("SELECT now64(3)").result_rows[0][0] > cut, 10, "the engine's clock to pass the cut")


def test_only_structures_stored_by_the_cut_are_learnt_and_a_later_read_gives_the_same(ch: Any) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    first = lab(event_id="l-1", substance={"name": "Protonitazepyne", "smiles": PROTONITAZEPYNE}, lab_id="LAB-FR-01")
    assert _store(sink, [first]) == 1
    cut = _newest_stored(ch)
    before = sink.learnt_structures(cut)
    assert [(s.name, s.smiles, s.family) for s in before] == [("Protonitazepyne", PROTONITAZEPYNE, "nitazene")]
    assert sink.learnt_structures(cut - timedelta(milliseconds=1)) == []  # stored after that cut: not learnt then

    _wait_past(ch, cut)
    later = [
        # the same structure under another name, stored after the cut: the name stays the first stored report's
        seizure(event_id="s-2", substance={"name": "pyrrolidino proto", "smiles": PROTONITAZEPYNE}),
        lab(event_id="l-3", substance={"name": "Isotonitazepyne", "smiles": ISOTONITAZEPYNE}, lab_id="LAB-FR-02"),
        lab(event_id="l-4", substance={"name": "3-MMC"}, lab_id="LAB-FR-03"),  # a name only: no structure to learn
    ]
    assert _store(sink, later) == 3
    assert _store(sink, [first]) == 0  # sent again (a replay): not stored twice, its ingested_at stays
    assert sink.learnt_structures(cut) == before  # what a replay of the alert reads: the same
    now = sink.learnt_structures(_newest_stored(ch))
    assert [s.key for s in now] == sorted(s.key for s in now)  # key order
    assert {s.name for s in now} == {"Protonitazepyne", "Isotonitazepyne"}  # first stored name per structure


def test_hostile_names_come_back_as_stored(ch: Any) -> None:
    """The store neither runs nor rewrites a name (a bound parameter, not SQL text): the message layer escapes it."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    name = "Proto'); DROP TABLE alerts;-- <b>x</b> {cut:Int64}"
    assert _store(sink, [lab(event_id="l-1", substance={"name": name, "smiles": PROTONITAZEPYNE})]) == 1
    (learnt,) = sink.learnt_structures(_newest_stored(ch))
    assert learnt.name == name
    assert ch.query("SELECT count() FROM alerts").result_rows[0][0] == 0


def test_the_worker_s_kept_structures_answer_every_cut_as_a_fresh_read(ch: Any) -> None:
    """The worker reads only what was stored since its last cut; a later cut, an earlier one (a replay), the
    same one: each answer is the one a fresh read of the store gives."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    cuts = []
    records = [
        lab(event_id="l-1", substance={"name": "Protonitazepyne", "smiles": PROTONITAZEPYNE}, lab_id="LAB-FR-01"),
        seizure(event_id="s-2", substance={"name": "pyrrolidino proto", "smiles": PROTONITAZEPYNE}),
        lab(event_id="l-3", substance={"name": "Isotonitazepyne", "smiles": ISOTONITAZEPYNE}, lab_id="LAB-FR-02"),
    ]
    for record in records:
        assert _store(sink, [record]) == 1
        cuts.append(_newest_stored(ch))
        assert sink.learnt_structures(cuts[-1]) == learnt_structures(ch, cuts[-1])
        _wait_past(ch, cuts[-1])
    for cut in [cuts[0], cuts[2], cuts[1], cuts[0] - timedelta(milliseconds=1), cuts[2]]:
        assert sink.learnt_structures(cut) == learnt_structures(ch, cut)
    assert [s.name for s in sink.learnt_structures(cuts[1])] == ["Protonitazepyne"]  # the first stored name
    assert len(sink.learnt_structures(cuts[2])) == 2
