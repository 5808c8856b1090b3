"""ingest-history on the real embedded engine: counts add up, re-ingest adds nothing, rows equal the sink's."""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.settings import Settings
from synthwatch.stackfile import StackInfo, write_stack
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.backfill.ingest import IngestRefused, ingest_history
from synthwatch.stream_apps.storage.clickhouse import connect, migrate
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.conftest import cli_env, start_worker, stop_worker
from tests.support.factories import alike_numbered_reports, lab, seizure

# An uncatalogued structure reported under a street name, later seized by that name only: its identity
# depends on file order (the name is learnt from the lab report), across chunk boundaries.
NOVEL_SMILES = "CCCC(NC)C(=O)c1ccc(Cl)cc1"


def _lines(days: int = 6, per_day: float = 250.0, start: date | None = None) -> tuple[list[str], Any]:
    sim = simulate(SimulationConfig(days=days, seed=5, start=start or date(2025, 6, 1), events_per_day=per_day))
    return sim.lines, sim.truth


def _with_novel_name(lines: list[str]) -> list[str]:
    """Insert a lab report naming the novel structure, then name-only seizures of it far later."""
    out = list(lines)
    out.insert(50, json.dumps(lab(event_id="novel-lab", substance={"name": "Blue Lotus X", "smiles": NOVEL_SMILES})))
    for i in range(5):
        out.insert(400 + 200 * i, json.dumps(seizure(event_id=f"novel-s-{i}", substance={"name": "blue lotus x"})))
    out.insert(10, "")  # blank lines are not records
    return out


def run_data_cli(settings: Settings, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``synthwatch ARGS`` with the data commands mounted (works before and after cli.py mounts them)."""
    code = (
        "from synthwatch.cli.main import app\n"
        "from synthwatch.cli.data import register\n"
        "if not any(c.name == 'ingest-history' for c in app.registered_commands):\n"
        "    register(app)\n"
        "app()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=cli_env(settings, COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _stored(client: Any) -> int:
    return int(client.command("SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)"))


def test_counts_add_up_and_reingest_adds_nothing(ch: Any, ch_settings: Settings, tmp_path: Path) -> None:
    lines, truth = _lines()
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = ingest_history(ch_settings, path, batch_size=500, progress=False, workers=0, client=ch)
    print(
        f"lines {first.lines}: stored {first.stored}, duplicates {first.duplicates}, rejected {first.rejected} "
        f"(truth: {truth.valid_unique} valid, {truth.duplicates} re-sent, {truth.malformed} malformed)"
    )
    assert first.balanced and first.lines == truth.lines == len(lines)
    assert (first.stored, first.duplicates, first.rejected) == (truth.valid_unique, truth.duplicates, truth.malformed)
    assert _stored(ch) == truth.valid_unique
    assert ch.command("SELECT count() - uniqExact(event_id) FROM border_seizures") == 0
    rejects = ch.query("SELECT source, stage, reason FROM rejects ORDER BY source").result_rows
    assert len(rejects) == truth.malformed and {r[1] for r in rejects} == {"ingest"}
    assert {int(r[0].rsplit(":", 1)[1]) for r in rejects} == {m.line for m in truth.malformed_kinds}
    assert all(r[0].startswith("history.ndjson:") and r[2] for r in rejects)

    again = ingest_history(ch_settings, path, batch_size=700, progress=False, workers=0, client=ch)
    print(f"re-ingest: stored {again.stored}, duplicates {again.duplicates}, new rejects {again.rejects_stored}")
    assert again.balanced and again.stored == 0 and again.rejects_stored == 0
    assert again.already_stored == truth.valid_unique and again.rejected == truth.malformed
    assert _stored(ch) == truth.valid_unique
    assert ch.command("SELECT count() FROM rejects") == truth.malformed


@pytest.mark.parametrize("encoding", ["sql", "json", "arrow"])
def test_two_reporters_rows_under_one_id_place_and_time_survive_a_merge(
    ch: Any, ch_settings: Settings, tmp_path: Path, encoding: str
) -> None:
    """ingest-history writes the reporter (the raw tables' sorting key has it since migration 0014): two labs'
    history rows under one id, place and time (a date-only sample date) no longer merge into one row."""
    records = alike_numbered_reports()
    path = tmp_path / "history.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    run = ingest_history(ch_settings, path, progress=False, workers=0, client=ch, encoding=encoding)
    assert run.balanced and run.stored == 4
    ch.command("OPTIMIZE TABLE lab_detections FINAL")
    ch.command("OPTIMIZE TABLE border_seizures FINAL")
    assert sorted(ch.query("SELECT lab_id, reporter FROM lab_detections").result_rows) == [
        ("LAB-A", "lab:LAB-A"),
        ("LAB-B", "lab:LAB-B"),
    ]
    assert sorted(ch.query("SELECT agency, reporter FROM border_seizures").result_rows) == [
        ("Douane ML", "agency:Douane ML"),
        ("Douane SN", "agency:Douane SN"),
    ]


@pytest.mark.slow
def test_rows_equal_what_the_stream_sink_stores(ch: Any, ch_settings: Settings, tmp_path: Path) -> None:
    """Parallel chunks (2 processes, small batches) give the same rows as one Intake + the sink, column for column."""
    lines = _with_novel_name(_lines()[0])
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    migrate(ch)
    batch = Intake().process(RawMessage(f"f:{i}", line) for i, line in enumerate(lines) if line.strip())
    ClickHouseSink(ch).store_events(batch.events)

    other = ch_settings.model_copy(update={"clickhouse_database": f"{ch_settings.clickhouse_database}_ingest"})
    client = connect(other)
    try:
        summary = ingest_history(other, path, batch_size=300, progress=False, workers=2, client=client)
        print(f"{summary.lines} lines in {summary.seconds:.2f} s with {summary.workers} processes: {summary}")
        assert summary.balanced and summary.stored == len(batch.events) and summary.blank_lines == 1
        for table in ("lab_detections", "border_seizures"):
            # content_hash is the one designed difference: the worker stores each event's digest (a changed
            # re-send is refused), ingest-history leaves it '' (its SQL path cannot compute pydantic's JSON)
            query = f"SELECT * EXCEPT (ingested_at, content_hash) FROM {{db}}.{table} ORDER BY event_id"
            expected = ch.query(query.format(db=ch.database)).result_rows
            got = client.query(query.format(db=client.database)).result_rows
            assert len(got) == len(expected) > 0
            assert got == expected, table
            digests = f"SELECT countIf(content_hash = ''), count() FROM {{db}}.{table}"
            assert ch.query(digests.format(db=ch.database)).result_rows == [(0, len(expected))]
            assert client.query(digests.format(db=client.database)).result_rows == [(len(got), len(got))]
            print(f"{table}: {len(got)} rows equal to the sink's, every column but content_hash")
        keys = client.query("SELECT DISTINCT substance_key FROM border_seizures WHERE startsWith(event_id, 'novel-s')")
        lab_key = client.command("SELECT substance_key FROM lab_detections WHERE event_id = 'novel-lab'")
        print(f"novel street name resolved to {keys.result_rows} (lab report's structure key {lab_key})")
        assert keys.result_rows == [(lab_key,)] and len(lab_key) == 14  # learnt chunks earlier, not a name key
    finally:
        client.command(f"DROP DATABASE IF EXISTS {other.clickhouse_database}")
        client.close()


def _awkward_records() -> list[str]:
    """Values where a typed (Arrow) path and ClickHouse's JSON parsing could disagree."""
    return [
        json.dumps(lab(event_id="odd-us", occurred_at="2026-03-02T09:00:00.123987+05:30", purity_pct=None)),
        json.dumps(lab(event_id="odd-rep", reported_at="2026-03-03T00:00:00.0005Z", confirmed=False)),
        json.dumps(seizure(event_id="odd-extra", source_batch="B-7", substance={"name": "Tramadol", "lot": 3})),
        json.dumps(seizure(event_id="odd-origin", origin_country="NG", destination_country="ML")),
        json.dumps(seizure(event_id="odd-qty", quantity={"value": 0.1 + 0.2, "unit": "mg"})),
        json.dumps(seizure(event_id="odd-ml", quantity={"value": 12, "unit": "ml"}, border_point="Gao 🚧 «nord»")),
        json.dumps(seizure(event_id="odd-tabs", quantity={"value": 40, "unit": "tablets"})),
        json.dumps(lab(event_id="odd-cas", substance={"name": "Ketamine", "cas": "6740-88-1", "inchikey": None})),
        # where the engine's parsing (the sql path) could disagree with pydantic's
        json.dumps(lab(event_id="odd-z", occurred_at="2026-03-01T23:30:00.5-00:00", purity_pct=50)),
        json.dumps(lab(event_id="odd-neg", occurred_at="2026-02-28T22:00:00-03:30", reported_at=None)),
        json.dumps(lab(event_id="odd-feb", occurred_at="2026-02-29T10:00:00Z")),  # no such day: rejected
        json.dumps(lab(event_id="odd-24h", occurred_at="2026-03-01T24:00:00Z")),
        json.dumps(lab(event_id="odd-case", country="ml", region="ml-bko", substance={"name": "  MDMA "})),
        json.dumps(seizure(event_id="odd-exp", quantity={"value": 1e3, "unit": "kg"}, conveyance="sea")),
        json.dumps(lab(event_id="odd-bool", confirmed="yes")),  # lax: pydantic reads it as True
        json.dumps(lab(event_id="odd-num", purity_pct="12.5")),
        json.dumps(lab(event_id="odd-badcas", substance={"name": "Ketamine", "cas": "6740-88-2"})),
        json.dumps(lab(event_id="odd-key", substance={"name": "Ketamine", "inchikey": "yqeznsilzqqkae-uhfffaoysa-n"})),
        json.dumps(lab(event_id="odd-dup")).replace('"lab_id": ', '"lab_id": "LAB-X", "lab_id": ', 1),
        json.dumps(lab(event_id="odd-crlf"), separators=(",", ":")) + "\r",
    ]


def test_a_file_name_the_engine_would_expand_loads_through_the_workers(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    """ClickHouse's file() reads ``history{1}.ndjson`` as a glob (and finds no such file: 0 lines): that file
    takes the Arrow path, and asking for the engine's path says why not."""
    path = tmp_path / "history{1}.ndjson"
    path.write_text(json.dumps(lab(event_id="glob-1")) + "\n" + json.dumps(seizure(event_id="glob-2")) + "\n")
    summary = ingest_history(ch_settings, path, progress=False, workers=0, client=ch)
    assert (summary.lines, summary.stored, summary.rejected) == (2, 2, 0)
    with pytest.raises(ValueError, match="must not contain"):
        ingest_history(ch_settings, path, progress=False, workers=0, client=ch, encoding="sql")
    quoted = tmp_path / "l'historique \\ été.ndjson"  # quoted into the engine's SQL, byte for byte
    quoted.write_text(json.dumps(lab(event_id="quoted-1")) + "\n")
    summary = ingest_history(ch_settings, quoted, progress=False, workers=0, client=ch, encoding="sql")
    assert (summary.lines, summary.stored) == (1, 1)


#: ``reports_daily`` re-summed by key: its rows as stored are one per insert's group until background merges
#: (restarted after a load) sum them, at a time no test controls, in an order that moves a float sum's last bit.
DAILY_SUMS = (
    "SELECT day, country, region, kind, family, substance_key, arraySort(groupUniqArray(substance_name)), "
    "sum(reports), round(sum(grams), 6) FROM reports_daily GROUP BY ALL ORDER BY ALL"
)


@pytest.mark.slow
def test_arrow_path_stores_what_the_json_path_stores(ch: Any, ch_settings: Settings, tmp_path: Path) -> None:
    """The fast paths (the engine parsing the file: ``sql``; Arrow columns from the workers) and the
    reference path (Python validates, ClickHouse reads the rows as JSON) store identical rows, rejects and
    counts: a fresh load over events already stored, then a re-ingest."""
    lines = _with_novel_name(_lines()[0])
    lines[30:30] = _awkward_records()
    path, head = tmp_path / "history.ndjson", tmp_path / "head.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    head.write_text("\n".join(lines[:700]) + "\n", encoding="utf-8")  # stored before the full file
    tables = {
        "lab_detections": "* EXCEPT ingested_at",
        "border_seizures": "* EXCEPT ingested_at",
        "rejects": "* EXCEPT rejected_at",
        "reports_daily": DAILY_SUMS,
    }
    stored: dict[str, dict[str, list[Any]]] = {}
    counts: dict[str, list[tuple[Any, ...]]] = {}
    for encoding in ("json", "arrow", "sql"):
        other = ch_settings.model_copy(update={"clickhouse_database": f"{ch_settings.clickhouse_database}_{encoding}"})
        client = connect(other)
        try:
            runs = [
                ingest_history(other, file, batch_size=400, progress=False, workers=n, client=client, encoding=encoding)
                for file, n in ((head, 0), (path, 2), (path, 0))
            ]
            assert all(run.balanced for run in runs) and runs[1].already_stored > 0 and runs[2].stored == 0
            counts[encoding] = [
                (r.lines, r.stored, r.duplicates_in_file, r.already_stored, r.rejected, r.reject_reasons) for r in runs
            ]
            stored[encoding] = {
                table: client.query(
                    columns if columns.startswith("SELECT") else f"SELECT {columns} FROM {table} ORDER BY tuple(*)"
                ).result_rows
                for table, columns in tables.items()
            }
        finally:
            client.command(f"DROP DATABASE IF EXISTS {other.clickhouse_database}")
            client.close()
    print(f"counts per run (json path): {[c[:5] for c in counts['json']]}")
    assert counts["arrow"] == counts["json"]
    assert counts["sql"] == counts["json"]
    for table in tables:
        assert len(stored["arrow"][table]) > 0
        assert stored["arrow"][table] == stored["json"][table], table
        assert stored["sql"][table] == stored["json"][table], table
        print(f"{table}: {len(stored['arrow'][table])} rows, equal on the three paths, every column")
    odd = {row[0]: row for t in ("lab_detections", "border_seizures") for row in stored["arrow"][t]}
    refused = {"odd-feb", "odd-24h", "odd-badcas"}  # the contract refuses them (each path the same way)
    assert {key for key in odd if str(key).startswith("odd-")} == {
        json.loads(r)["event_id"] for r in _awkward_records()
    } - refused
    assert refused <= {row[4] for row in stored["sql"]["rejects"]}  # reject_id, stage, source, reason, event_id
    assert odd["odd-us"][1].microsecond == 123000  # DateTime64(3): truncated to the millisecond on both paths


def test_refuses_while_a_stack_owns_the_embedded_engine(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    write_stack(
        settings,
        StackInfo(os.getppid(), "127.0.0.1:9092", "http://127.0.0.1:1", settings.resolved_clickhouse_url, "now"),
    )
    path = tmp_path / "x.ndjson"
    path.write_text(json.dumps(seizure()) + "\n")
    with pytest.raises(IngestRefused, match="stop it first"):
        ingest_history(settings, path, progress=False)
    assert not settings.embedded_clickhouse_path.exists()  # refused before opening anything


@pytest.mark.slow
@pytest.mark.integration
def test_worker_started_after_a_backfill_rebuilds_its_state(tmp_path: Path) -> None:
    """`synthwatch ingest-history` then `synthwatch up` on the same data: /ready shows the replayed history."""
    start = (datetime.now(UTC) - timedelta(days=10)).date()
    lines, truth = _lines(days=8, per_day=150, start=start)
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    done = run_data_cli(settings, "ingest-history", str(path))
    print(done.stdout[-1500:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{truth.valid_unique:,}" in done.stdout

    up = start_worker(settings, tmp_path / "up.log", command="up")
    try:
        rebuild = up.stats()["rebuild"]
        print(f"rebuild after backfill: {rebuild}")
        assert rebuild["events_replayed"] > 0 and rebuild["substances"] > 0
        assert up.count("SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)") == (
            truth.valid_unique
        )
        refused = run_data_cli(settings, "ingest-history", str(path))
        assert refused.returncode != 0 and "stop it first" in refused.stderr
    finally:
        stop_worker(up)


@pytest.mark.slow
def test_storage_benchmarks_run_in_their_own_process() -> None:
    """Smoke test: each benchmark opens its own engine, so it runs in a child process here."""
    done = subprocess.run(
        [sys.executable, "-m", "synthwatch.bench.storage", "3000"],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "COLUMNS": "200"},
    )
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "events/s" in done.stdout and "lines/s" in done.stdout


def test_unmerged_load_reads_right_and_merges_resume(
    ch: Any, ch_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load pauses merges: without FINAL, counts and aggregates are already right; afterwards they merge.

    The engine merges in the background as soon as merges resume, so the test keeps them paused after
    the load itself (the load is told it did not pause them and leaves them so) and reads the unmerged
    parts, then resumes them and forces the merge: right before, right after, whatever the scheduling.
    """
    import synthwatch.stream_apps.storage.backfill.ingest as history

    pauses: list[bool] = []
    history_pause = history._pause_merges

    def pause_and_keep_paused(client: Any, settings: Settings) -> bool:
        pauses.append(history_pause(client, settings))
        return False  # so the load does not resume them: the test does, after reading the unmerged parts

    monkeypatch.setattr(history, "_pause_merges", pause_and_keep_paused)
    lines, truth = _lines(days=4)
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = ch_settings.clickhouse_database

    def parts(table: str) -> int:
        return int(
            ch.command(f"SELECT count() FROM system.parts WHERE active AND database = '{db}' AND table = '{table}'")
        )

    try:
        summary = ingest_history(ch_settings, path, batch_size=200, progress=False, workers=0, client=ch)
        assert pauses == [True]  # the embedded engine's merges were paused for the load
        assert summary.stored == truth.valid_unique == _stored(ch)
        unmerged = parts("lab_detections")
        raw = (
            "SELECT toDate(occurred_at) AS day, substance_key, 1 AS n, ifNull(grams, 0) AS g FROM border_seizures "
            "UNION ALL SELECT toDate(occurred_at), substance_key, 1, 0 FROM lab_detections"
        )
        aggregate = (
            "SELECT day, substance_key, sum(reports), round(sum(grams), 3) FROM reports_daily GROUP BY ALL ORDER BY ALL"
        )
        recount = f"SELECT day, substance_key, sum(n), round(sum(g), 3) FROM ({raw}) GROUP BY ALL ORDER BY ALL"
        expected = ch.query(recount).result_rows
        print(f"{unmerged} unmerged lab parts, {parts('reports_daily')} daily parts; {len(expected)} daily rows")
        assert unmerged > 1 and parts("reports_daily") > 1  # one part per insert: nothing merged them
        assert expected and ch.query(aggregate).result_rows == expected
    finally:
        ch.command("SYSTEM START MERGES")  # the session's engine is shared by the other tests
    ch.command("OPTIMIZE TABLE lab_detections FINAL")
    ch.command("OPTIMIZE TABLE reports_daily FINAL")
    assert parts("lab_detections") == 1 and parts("reports_daily") == 1
    assert ch.query(aggregate).result_rows == expected and _stored(ch) == truth.valid_unique


def test_slow_lines_judged_in_the_pool_store_what_in_process_judging_stores(
    ch: Any, ch_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's path hands the lines it does not accept to Python; with a pool they are split over its
    processes. Same verdicts, same order, same rows: every column of every table, the rejects and the
    counts equal a run that judges them all in this process."""
    from synthwatch.stream_apps.storage.backfill import engine

    lines = _with_novel_name(_lines(days=2)[0])
    slow = [  # lax spellings pydantic normalises, and lines it refuses: none is taken by the engine
        json.dumps(lab(event_id=f"lax-{i}", country="ml", region="ml-bko", substance={"name": f"\u00a0MDMA {i % 3} "}))
        if i % 3 == 0
        else json.dumps(lab(event_id=f"lax-{i}", confirmed="yes", purity_pct=str(i % 90)))
        if i % 3 == 1
        else '{"kind": "lab_detection", "event_id": "broken-' + str(i)
        for i in range(90)
    ]
    for i, line in enumerate(slow):
        lines.insert(7 * i + 3, line)
    lines[30:30] = _awkward_records()
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    splits: list[int] = []
    judged = engine.EngineChunks._judged

    def spy(self: Any, slow: list[tuple[int, bytes]]) -> Any:
        parts = judged(self, slow)
        splits.append(len(parts))
        return parts

    monkeypatch.setattr(engine.EngineChunks, "_judged", spy)
    monkeypatch.setattr(engine, "_SPLIT_SLOW_LINES", 2)  # the file's chunks have a few dozen slow lines each
    tables = {
        "lab_detections": "* EXCEPT ingested_at",
        "border_seizures": "* EXCEPT ingested_at",
        "rejects": "* EXCEPT rejected_at",
        "reports_daily": DAILY_SUMS,
    }
    stored: dict[int, dict[str, list[Any]]] = {}
    counts: dict[int, tuple[Any, ...]] = {}
    for workers in (0, 2):
        other = ch_settings.model_copy(update={"clickhouse_database": f"{ch_settings.clickhouse_database}_{workers}"})
        client = connect(other)
        try:
            run = ingest_history(other, path, batch_size=300, progress=False, workers=workers, client=client)
            assert run.balanced
            counts[workers] = (run.lines, run.stored, run.duplicates, run.rejected, run.blank_lines, run.reject_reasons)
            stored[workers] = {
                table: client.query(
                    columns if columns.startswith("SELECT") else f"SELECT {columns} FROM {table} ORDER BY tuple(*)"
                ).result_rows
                for table, columns in tables.items()
            }
        finally:
            client.command(f"DROP DATABASE IF EXISTS {other.clickhouse_database}")
            client.close()
        if workers == 0:
            assert splits and set(splits) == {1}  # judged here: the reference
            splits.clear()
    assert splits and max(splits) == 2  # the pool judged them, in two parts per chunk
    assert counts[2] == counts[0]
    assert counts[0][3] >= 30  # the broken lines are rejected, the lax ones stored
    for table in tables:
        assert len(stored[0][table]) > 0, table
        assert stored[2][table] == stored[0][table], table
    lax = {row[0] for row in stored[2]["lab_detections"] if str(row[0]).startswith("lax-")}
    assert len(lax) == 60


def _last_json_line(code: str, *args: str) -> Any:
    """Run ``code`` in a fresh interpreter (it opens an engine of its own, which this process cannot) and
    return the JSON of its last line of output."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_lines_only_python_accepts_go_in_without_pandas_and_keep_their_instants(tmp_path: Path) -> None:
    """The engine's path stores the lines only Python accepts (here a lax ``confirmed``) through a Native
    insert of millisecond ticks: pandas is never imported (~0.3 CPU s a load: pyarrow's ``pa.array``
    imported it), and each instant is truncated to the millisecond, as the engine truncates a text
    timestamp with more digits, whatever its offset."""
    from synthwatch.schemas import parse_event

    stamps = [
        "2026-03-02T09:00:00.123999Z",
        "2026-03-02T09:00:00.9999+05:30",
        "2026-03-02T23:59:59.0005-01:00",
        "2026-03-02T00:00:00Z",
    ]
    lines = [
        json.dumps(lab(event_id=f"lax-{i}", confirmed="yes", occurred_at=stamp, reported_at=stamps[0] if i else None))
        for i, stamp in enumerate(stamps)
    ]
    lines.append(json.dumps(lab(event_id="plain", occurred_at=stamps[1])))  # one the engine takes, to compare
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from synthwatch.settings import Settings\n"
        "from synthwatch.stream_apps.storage.backfill.ingest import ingest_history\n"
        "from synthwatch.stream_apps.storage.clickhouse import connect\n"
        "settings = Settings(data_dir=Path(sys.argv[1]))\n"
        "client = connect(settings)\n"
        "run = ingest_history(settings, sys.argv[2], progress=False, workers=0, client=client, encoding='sql')\n"
        "pandas = 'pandas' in sys.modules\n"
        "rows = client.query('SELECT event_id, toUnixTimestamp64Milli(occurred_at), "
        "toUnixTimestamp64Milli(reported_at), confirmed FROM lab_detections ORDER BY event_id').result_rows\n"
        "print(json.dumps({'pandas': pandas, 'stored': run.stored, 'rows': rows}))\n"
    )
    result = _last_json_line(code, str(tmp_path / "data"), str(path))
    assert result["pandas"] is False
    assert result["stored"] == len(lines)

    def millis(instant: datetime | None) -> int | None:
        return None if instant is None else calendar.timegm(instant.utctimetuple()) * 1000 + instant.microsecond // 1000

    expected = []
    for line in lines:
        event = parse_event(line)
        expected.append([event.event_id, millis(event.occurred_at), millis(event.reported_at), event.confirmed])
    assert result["rows"] == sorted(expected)
    assert result["rows"][1][1] == millis(datetime(2026, 3, 2, 3, 30, 0, 999_900, tzinfo=UTC))  # lax-1: +05:30


def test_first_chunk_is_parsed_while_the_migrations_run(tmp_path: Path) -> None:
    """On an engine it opens itself, the engine's path parses its first chunk while the migrations run on a
    second handle (they waited on the engine's threads and the disk: ~1.3 s at load 4 before the first parse);
    the raw tables are touched only once they are done, and a failed migration still fails the load.

    The stand-in migration waits until the first parse has started: run in order (the code before), it would
    wait 30 s in vain and fail the load."""
    lines = [json.dumps(lab(event_id=f"m-{i}")) for i in range(40)] + [json.dumps(seizure(event_id="m-s"))]
    (tmp_path / "history.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = (
        "import json, sys, threading\n"
        "from synthwatch.stream_apps.storage import clickhouse\n"
        "from synthwatch.stream_apps.storage.backfill import engine, ingest\n"
        "from synthwatch.settings import Settings\n"
        "parsing = threading.Event()\n"
        "real_parse, real_migrate = engine.EngineChunks.parse, clickhouse.migrate\n"
        "def parse(self, start, end):\n"
        "    parsing.set()\n"
        "    return real_parse(self, start, end)\n"
        "def migrate(client, migrations=None):\n"
        "    if not parsing.wait(30):\n"
        "        raise RuntimeError('the first parse did not start while the migrations ran')\n"
        "    if sys.argv[3] == 'fail':\n"
        "        raise clickhouse.MigrationError('migration 0001_x was started but not finished')\n"
        "    return real_migrate(client, migrations)\n"
        "engine.EngineChunks.parse, ingest.migrate = parse, migrate\n"
        "settings = Settings(data_dir=sys.argv[1])\n"
        "try:\n"
        "    run = ingest.ingest_history(settings, sys.argv[2], progress=False, workers=0)\n"
        "except clickhouse.MigrationError as error:\n"
        "    print(json.dumps({'failed': str(error)}))\n"
        "    sys.exit(0)\n"
        "client = clickhouse.connect(settings)\n"
        "ids = [r[0] for r in client.query('SELECT event_id FROM lab_detections UNION ALL '\n"
        "    'SELECT event_id FROM border_seizures').result_rows]\n"
        "print(json.dumps({'stored': run.stored, 'balanced': run.balanced, 'ids': sorted(ids)}))\n"
    )
    results = {
        case: _last_json_line(code, str(tmp_path / f"data-{case}"), str(tmp_path / "history.ndjson"), case)
        for case in ("ok", "fail")
    }
    assert results["ok"] == {
        "stored": len(lines),
        "balanced": True,
        "ids": sorted(json.loads(line)["event_id"] for line in lines),
    }
    assert results["fail"] == {"failed": "migration 0001_x was started but not finished"}


def test_a_line_dated_past_the_files_receipt_is_refused_as_the_worker_refuses_it(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    """The worker refuses an event time more than SYNTHWATCH_MAX_FUTURE_HOURS after its receipt; ingest-history
    stored such a line (a 2099 date), silently left out of the rebuilt state after. Now the file's receipt (its
    modification time) bounds its lines, on each path, with the worker's reason, and the counts add up."""
    from synthwatch.schemas.reject_reasons import reject_reason

    received = datetime(2026, 11, 1, 12, tzinfo=UTC)
    for encoding in ("sql", "arrow", "json"):
        dated = {
            f"{encoding}-near": "2026-11-02T11:00:00+00:00",  # 23 h after the file's receipt: a clock slip
            f"{encoding}-far": "2026-11-02T13:00:00+00:00",  # 25 h after
            f"{encoding}-2099": "2099-06-01T10:00:00+00:00",
            f"{encoding}-old": "2026-10-30T10:00:00+00:00",
            f"{encoding}-near-nz": "2026-11-02T23:00:00+12:00",  # 23 h after, written in UTC+12
            f"{encoding}-far-nz": "2026-11-03T00:30:00+12:00",  # 24.5 h after
        }
        path = tmp_path / f"{encoding}.ndjson"
        path.write_text("".join(json.dumps(seizure(event_id=i, occurred_at=at)) + "\n" for i, at in dated.items()))
        os.utime(path, (received.timestamp(), received.timestamp()))
        summary = ingest_history(ch_settings, path, progress=False, workers=0, client=ch, encoding=encoding)
        assert summary.balanced and (summary.lines, summary.stored, summary.rejected) == (6, 3, 3), encoding
        stored = ch.query(
            "SELECT event_id FROM border_seizures WHERE startsWith(event_id, %(p)s) ORDER BY event_id",
            parameters={"p": f"{encoding}-"},
        ).result_rows
        assert [r[0] for r in stored] == [f"{encoding}-{i}" for i in ("near", "near-nz", "old")], encoding
        rejects = ch.query(
            "SELECT event_id, stage, reason FROM rejects WHERE startsWith(event_id, %(p)s) ORDER BY event_id",
            parameters={"p": f"{encoding}-"},
        ).result_rows
        assert [(r[0], r[1]) for r in rejects] == [(f"{encoding}-{i}", "ingest") for i in ("2099", "far", "far-nz")]
        assert {reject_reason(r[2]) for r in rejects} == {"future_occurred_at"}, encoding
        assert "after the report was received (2026-11-01T12:00:00+00:00)" in rejects[0][2]


def test_another_reporters_id_is_not_a_duplicate_on_any_path(ch_settings: Settings, tmp_path: Path) -> None:
    """Event ids are unique per reporter only: lab A's live report under lab B's (predictable) id made B's
    history row 'already stored', and lab C's row in the file under B's id a duplicate. Each path now keeps
    every reporter's report, and a re-send of one (in the file, or re-ingested) is still a duplicate."""
    live = lab(event_id="2026-000123", lab_id="LAB-A", substance={"name": "ketamine"})
    history = [
        lab(event_id="2026-000123", lab_id="LAB-B", region="FR-IDF"),
        lab(event_id="2026-000124", lab_id="LAB-B"),
        lab(event_id="2026-000124", lab_id="LAB-C", region="FR-IDF"),
        lab(event_id="2026-000124", lab_id="LAB-C", region="FR-IDF"),  # a re-send: a duplicate
        seizure(event_id="2026-000123", agency="LAB-A"),  # an agency named like a lab: another reporter
        seizure(event_id="2026-000123", agency="LAB-A"),
    ]
    path = tmp_path / "history.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    for encoding in ("json", "arrow", "sql"):
        other = ch_settings.model_copy(update={"clickhouse_database": f"{ch_settings.clickhouse_database}_{encoding}"})
        client = connect(other)
        try:
            migrate(client)
            ClickHouseSink(client).store_events(Intake().process([RawMessage("t:0:0", json.dumps(live))]).events)
            run = ingest_history(other, path, progress=False, workers=0, client=client, encoding=encoding)
            assert (run.stored, run.duplicates_in_file, run.already_stored) == (4, 2, 0), encoding
            again = ingest_history(other, path, progress=False, workers=0, client=client, encoding=encoding)
            assert (again.stored, again.already_stored) == (0, 4), encoding
            rows = client.query(
                "SELECT * FROM (SELECT 'lab' AS k, lab_id AS who, event_id FROM lab_detections UNION ALL "
                "SELECT 'agency', agency, event_id FROM border_seizures) ORDER BY k, who, event_id"
            ).result_rows
            assert rows == [
                ("agency", "LAB-A", "2026-000123"),
                ("lab", "LAB-A", "2026-000123"),
                ("lab", "LAB-B", "2026-000123"),
                ("lab", "LAB-B", "2026-000124"),
                ("lab", "LAB-C", "2026-000124"),
            ], encoding
        finally:
            client.command(f"DROP DATABASE IF EXISTS {other.clickhouse_database}")
            client.close()
