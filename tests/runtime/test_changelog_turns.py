"""A checkpoint's changelog write (``StateTables.save``) gives the event loop a turn once it has held it for
``SAVE_TURN_SECONDS``, and writes the same records (keys, values, signatures, partitions, order) whenever the turns
come.

Why: the write of ~1,300-1,500 records a second gave the loop back only every 200 records, and in the worker those
slices held it 13-48 ms: the alerts over 120 ms overlapped them (docs/performance.md, "The alert tail, per alert").
The clock is the test's own (each record "costs" what the test says), so the turns are counted, never timed.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

from pydantic_core import to_json

from synthwatch.settings import Settings
from synthwatch.stream_apps.runtime import state_tables
from synthwatch.stream_apps.runtime.state_tables import StateSchema, StateTables
from synthwatch.stream_apps.runtime.transport import StateWrite, worker_app
from synthwatch.stream_apps.runtime.worker_signature import HEADER, WorkerSigner

KEY = b"k" * 32


class _Clock:
    """A clock that moves only when a record is sent (by ``cost`` seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tables(tmp_path: Path, clock: _Clock, cost: float) -> tuple[StateTables, list[tuple[Any, ...]]]:
    """The region table of a built (never started) worker app, its producer's send recording every record and
    acknowledging it at once, each send moving ``clock`` by ``cost``."""
    app: Any = worker_app(Settings(data_dir=tmp_path), "127.0.0.1:9", 6066)  # built only: nothing connects
    schema = StateSchema(key_serializer="json", value_serializer="raw")
    table = app.Table("detector-regions", partitions=4, schema=schema, value_type=bytes)
    sent: list[tuple[Any, ...]] = []

    async def send(*record: Any) -> Any:
        sent.append(record)
        clock.now += cost
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    app.producer.send = send
    tables = StateTables(app, WorkerSigner(KEY), table, None)
    tables.clock = clock  # set, not passed: the same test runs against code without the field
    return tables, sent


def _changes(n: int) -> list[state_tables.Change]:
    """``n`` records over four partitions: dicts and already-encoded bytes, as the agents drain them."""
    return [
        (k % 4, f"S:XX-R{k % 37:03d}|KEY{k:05d}", {"d": [k, k + 1], "w": "2026-12-07"} if k % 3 else b'{"r":%d}' % k)
        for k in range(n)
    ]


def _save_counting_turns(
    tmp_path: Path, n: int, cost: float, abandon_at_turn: int | None = None
) -> tuple[list[Any], list[tuple[Any, ...]], list[int], StateTables]:
    """Save ``n`` records while another task counts its turns: the records sent when each turn came. With
    ``abandon_at_turn``, a revoke gives up on the write at that turn of the other task."""
    clock = _Clock()
    tables, sent = _tables(tmp_path, clock, cost)
    turns: list[int] = []

    async def run() -> list[Any]:
        writing = StateWrite(None)
        saving = asyncio.ensure_future(tables.save(tables.regions, _changes(n), writing))
        while not saving.done():
            await asyncio.sleep(0)
            turns.append(len(sent))
            if abandon_at_turn is not None and len(turns) == abandon_at_turn:
                writing.abandoned = True
        return await saving

    return asyncio.run(run()), sent, turns, tables


def test_another_task_gets_the_loop_once_the_write_has_held_it_for_its_turn(tmp_path: Path) -> None:
    cost = 0.00025  # a record; 4 of them fill a turn of 1 ms
    futures, sent, turns, _ = _save_counting_turns(tmp_path, 1000, cost)
    assert len(sent) == len(futures) == 1000
    gaps = [b - a for a, b in zip([0, *turns], turns, strict=False)]
    most = math.ceil(state_tables.SAVE_TURN_SECONDS / cost)
    # Failed before (a turn every 200 records, whatever they cost): the other task waited 200 records at a time.
    assert max(gaps) <= most, f"{max(gaps)} records sent between two turns of the other task (at most {most})"
    assert len(turns) >= 1000 // most


def test_a_write_of_cheap_records_takes_few_turns(tmp_path: Path) -> None:
    """Records costing nothing on the clock are sent in one piece: the turns are by time held, not by count."""
    futures, sent, turns, _ = _save_counting_turns(tmp_path, 1000, 0.0)
    assert len(sent) == len(futures) == 1000
    assert turns[0] == 1000  # the other task's first turn came after the whole write


def test_the_records_are_the_same_whenever_the_turns_come(tmp_path: Path) -> None:
    """Keys as Faust's json codec encodes them, values as drained (dicts encoded by pydantic-core), each signed for
    its topic and partition, in the order drained; the table holds each value; a turn after every record or none
    at all changes nothing of it."""
    _, often, turns_often, tables = _save_counting_turns(tmp_path / "a", 300, 1.0)  # a turn after every record
    _, never, turns_never, _ = _save_counting_turns(tmp_path / "b", 300, 0.0)
    assert len(turns_often) >= 300 and turns_never == [300]
    assert often == never
    topic = tables.regions.changelog_topic.get_topic_name()
    signer = WorkerSigner(KEY)
    expected = []
    for partition, key, value in _changes(300):
        encoded = value if isinstance(value, bytes) else to_json(value)
        raw_key = json.dumps(key).encode()
        expected.append((topic, raw_key, encoded, partition, None, signer.headers(topic, raw_key, encoded, partition)))
        assert tables.regions.data[key] == encoded
    assert often == expected
    for _, raw_key, encoded, partition, _, headers in often:
        assert [name for name, _ in headers] == [HEADER]
        assert signer.valid(topic, raw_key, encoded, headers, partition)


def test_a_write_abandoned_at_a_turn_sends_nothing_more(tmp_path: Path) -> None:
    """A revoke that gives up on the write (``writing.abandoned``) during a turn: the records sent before it are
    all that is sent, and their acknowledgements are what the write returns."""
    cost = 0.00025
    futures, sent, turns, _ = _save_counting_turns(tmp_path, 1000, cost, abandon_at_turn=3)
    assert 0 < len(sent) == len(futures) == turns[2] < 1000
    keys = [json.dumps(key).encode() for _, key, _ in _changes(1000)]
    assert [record[1] for record in sent] == keys[: len(sent)]  # a prefix, in order
