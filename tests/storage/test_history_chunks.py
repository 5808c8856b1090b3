"""A chunk parsed by ``ingest-history``'s worker loop judges every line as ``parse_event`` does.

The loop inlines ``parse_event``'s fast step (it is most of the per-line cost) and sends what that step
refuses to ``parse_event`` itself; these tests compare the loop's verdicts, line by line, with
``parse_event`` on the same lines (no engine needed: the chunk's output is inspected directly).
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pyarrow as pa
import pytest

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import WireError, parse_event
from synthwatch.stream_apps.storage.backfill.ingest import _pool
from synthwatch.stream_apps.storage.backfill.parse import Chunk, ChunkParser
from synthwatch.stream_apps.storage.backfill.prepass import Prepass, compute_structures, scan_part
from synthwatch.stream_apps.storage.tables import LAB_TABLE, SEIZURE_TABLE
from tests.support.factories import lab, malformed_records, seizure


def _lines() -> list[str]:
    lines = list(simulate(SimulationConfig(days=4, seed=9, start=date(2026, 1, 1), events_per_day=300)).lines)
    odd = [r if isinstance(r, str) else json.dumps(r) for _, r, _ in malformed_records("chunk")]
    odd += [
        json.dumps(seizure(event_id="c-norm", country=" ml", region="ml-bko")),  # normalised by the checked models
        json.dumps(lab(event_id="c-us", occurred_at="2026-03-02T09:00:00.123987+05:30")),
        json.dumps(seizure(event_id="c-extra", source_batch="B-7", substance={"name": "Tramadol", "lot": 3})),
        "  ",
        "\r",
        '{"kind": "lab_detection"',
        "[1, 2]",
    ]
    for i, line in enumerate(odd):
        lines.insert(7 + 37 * i, line)
    lines.insert(100, lines[5])  # one more re-send inside the chunk
    return lines


def _verdict(raw: bytes) -> tuple[str, str | None]:
    try:
        return "accepted", parse_event(raw).event_id
    except WireError as error:
        return "rejected", error.reason


@pytest.mark.parametrize("encoding", ["arrow", "json"])
def test_chunk_loop_gives_parse_events_verdict_on_every_line(tmp_path: Path, encoding: str) -> None:
    lines = _lines()
    path = tmp_path / "h.ndjson"
    path.write_bytes(("\n".join(lines) + "\n").encode())
    structures = compute_structures(sorted(scan_part(str(path), 0, path.stat().st_size)))
    chunk = Chunk(str(path), path.name, 0, path.stat().st_size, 1, known={}, structures=structures, encoding=encoding)
    result = ChunkParser().process(chunk)

    expected = {n: _verdict(line.encode()) for n, line in enumerate(lines, start=1) if line.strip()}
    rejected = {n: ("rejected", reason) for n, _, reason, _ in result.rejects}
    assert rejected == {n: v for n, v in expected.items() if v[0] == "rejected"}
    assert len(rejected) >= len(malformed_records("chunk"))

    accepted = [v[1] for v in expected.values() if v[0] == "accepted"]
    pending = {parse_event(raw).event_id for _, raw in result.pending}
    if encoding == "arrow":
        stored = [
            event_id
            for table in (LAB_TABLE, SEIZURE_TABLE)
            for event_id in pa.ipc.open_stream(result.arrow[table]).read_all().column("event_id").to_pylist()
        ]
    else:
        stored = [json.loads(line)["e"]["event_id"] for line in (*result.labs, *result.seizures)]
    print(f"{len(expected)} lines: {len(stored)} rows, {len(pending)} pending, {len(rejected)} rejected")
    assert sorted([*stored, *pending]) == sorted(set(accepted))  # each accepted event once, re-sends dropped
    assert result.duplicates == len(accepted) - len(set(accepted)) > 1  # the simulated re-sends and ours
    assert result.lines == len(expected) and result.blank == len(lines) - len(expected)


def test_prepass_of_the_head_computes_the_smiles_of_the_lines_starting_in_it(tmp_path: Path) -> None:
    """The engine's path puts only the file's head through the pre-pass (the rest comes from the engine):
    its lines, up to the end of the one under way where the head ends, and no other."""
    smiles = ["CCO", "CCN", "c1ccccc1", "CC(=O)O"]
    lines = [json.dumps(lab(event_id=f"p-{i}", substance={"name": f"s{i}", "smiles": s})) for i, s in enumerate(smiles)]
    path = tmp_path / "h.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pool = _pool(2)
    try:
        head = Prepass(pool, path, 2, head=len(lines[0]) + 1 + 5).structures()  # 5 bytes into the second line
        whole = Prepass(pool, path, 2).structures()
    finally:
        pool.shutdown()
    assert sorted(head) == ["CCN", "CCO"]
    assert sorted(whole) == sorted(smiles)
    assert head == {s: whole[s] for s in head}  # RDKit's same answers
