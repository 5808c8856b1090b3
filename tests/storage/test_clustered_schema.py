"""The clustered schema mirrors the single-node one: parsed by ClickHouse itself, same columns, same aggregates.

A cluster is not available here, so each clustered statement is checked three ways on the embedded
engine: ClickHouse's parser accepts it as written (``formatQuery``); rewritten to plain engines in a
scratch database it creates tables whose columns, keys and TTLs equal the single-node tables; and its
materialized views, fed the same rows as the single-node ones, produce the same aggregates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.corrections import judge_corrections, known_reports
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import Migration, available_migrations, connect, migrate
from synthwatch.stream_apps.storage.clustered import CLUSTERED_DIR, clustered_migrations
from synthwatch.stream_apps.storage.corrections import stored_reports
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.support.factories import lab, seizure

_ON_CLUSTER = re.compile(r"\s+ON CLUSTER\s+'\{cluster\}'")
_REPLICATED = re.compile(
    r"Replicated(\w*MergeTree)\('/clickhouse/tables/\{shard\}/\{database\}/\{table\}', '\{replica\}'(?:,\s*)?"
)
_DISTRIBUTED = re.compile(r"Distributed\('\{cluster\}', currentDatabase\(\), (\w+), ([^;]+)\)\s*$")
_NAME = re.compile(r"CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS (\w+)")
_ALTER = re.compile(r"ALTER TABLE (\w+)")


def _single() -> dict[int, Migration]:
    return {m.version: m for m in available_migrations()}


def _clustered() -> dict[int, Migration]:
    return {m.version: m for m in clustered_migrations()}


def _mirrored() -> list[int]:
    return sorted(set(_single()) & set(_clustered()))


def _plain(statement: str) -> str:
    """The clustered statement on one node without Keeper: plain engines, Distributed read through Merge."""
    text = _ON_CLUSTER.sub("", statement)
    text = _REPLICATED.sub(r"\1(", text).replace("MergeTree()", "MergeTree")
    return _DISTRIBUTED.sub(lambda m: f"Merge(currentDatabase(), '^{m.group(1)}$')", text)


@pytest.fixture
def scratch(ch: Any, ch_settings: Settings) -> Iterator[Any]:
    """A second database on the session's engine for the clustered tables (dropped afterwards)."""
    name = f"{ch_settings.clickhouse_database}_clustered"
    client = connect(ch_settings.model_copy(update={"clickhouse_database": name}))
    try:
        yield client
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def test_every_single_node_migration_has_a_clustered_mirror() -> None:
    single, clustered = _single(), _clustered()
    print(f"single-node {sorted(single)}, clustered {sorted(clustered)} in {CLUSTERED_DIR}")
    assert set(clustered) <= set(single), "a clustered file without a single-node original"
    missing = [f"{v:04d}_{single[v].name}" for v in sorted(set(single) - set(clustered))]
    if missing:
        pytest.skip(f"no clustered mirror yet for {missing}: add deploy/clickhouse/clustered/<same name>.sql")
    for version in single:
        assert clustered[version].name == single[version].name


@pytest.mark.parametrize("version", _mirrored())
def test_clustered_statements_parse_as_written(ch: Any, version: int) -> None:
    statements = _clustered()[version].statements()
    for statement in statements:
        formatted = ch.query("SELECT formatQuery(%(q)s)", parameters={"q": statement}).result_rows[0][0]
        if statement.startswith("INSERT INTO"):  # a one-off fill on the migrating node (takes no ON CLUSTER)
            assert re.match(r"INSERT INTO \w+_local \(", statement), statement[:80]
            continue
        assert "ON CLUSTER `{cluster}`" in formatted, statement[:80]
        altered = _ALTER.match(statement.lstrip())
        if altered is not None:  # a change to tables made earlier: the `_local` table and the Distributed one
            assert re.match(r"\s*ALTER TABLE (\w+) ON CLUSTER", statement), statement[:80]
            assert statement.count("ADD COLUMN") + statement.count("MODIFY COLUMN") == 1, statement[:80]
            continue
        name = _NAME.search(statement)
        assert name is not None, statement[:80]
        if "MATERIALIZED VIEW" in statement:
            assert re.search(r"\bTO \w+_local\b", formatted) and re.search(r"\bFROM \w+_local\b", formatted)
        elif name.group(1).endswith("_local"):
            assert "ENGINE = Replicated" in formatted and "'{replica}'" in formatted
        else:
            assert f"AS {name.group(1)}_local" in formatted and "ENGINE = Distributed('{cluster}'" in formatted
    print(f"{version:04d}: {len(statements)} statements parsed by ClickHouse")


def _columns(client: Any, database: str, table: str) -> list[tuple[str, str, str, str]]:
    return [
        tuple(row)
        for row in client.query(
            "SELECT name, type, default_kind, default_expression FROM system.columns "
            "WHERE database = %(d)s AND table = %(t)s ORDER BY position",
            parameters={"d": database, "t": table},
        ).result_rows
    ]


def _keys(client: Any, database: str, table: str) -> tuple[Any, ...]:
    row = client.query(
        "SELECT sorting_key, partition_key, primary_key, replaceRegexpOne(engine, '^Replicated', ''), "
        "extract(engine_full, 'TTL [^S]+') FROM system.tables WHERE database = %(d)s AND name = %(t)s",
        parameters={"d": database, "t": table},
    ).result_rows
    assert row, f"{database}.{table} does not exist"
    return tuple(row[0])


def test_clustered_tables_match_single_node_columns_and_keys(ch: Any, scratch: Any) -> None:
    versions = _mirrored()
    migrate(ch, [m for v, m in _single().items() if v in versions])
    for version in versions:
        for statement in _clustered()[version].statements():
            scratch.command(_plain(statement))
    single_db, scratch_db = ch.database, scratch.database
    tables = [
        row[0]
        for row in ch.query(
            "SELECT name FROM system.tables WHERE database = %(d)s AND engine NOT IN ('MaterializedView') "
            "AND name != 'schema_migrations' ORDER BY name",
            parameters={"d": single_db},
        ).result_rows
    ]
    views = {
        row[0]
        for row in ch.query(
            "SELECT name FROM system.tables WHERE database = %(d)s AND engine = 'MaterializedView'",
            parameters={"d": single_db},
        ).result_rows
    }
    clustered_views = {
        row[0]
        for row in scratch.query(
            "SELECT name FROM system.tables WHERE database = %(d)s AND engine = 'MaterializedView'",
            parameters={"d": scratch_db},
        ).result_rows
    }
    assert tables and views == clustered_views
    for table in tables:
        expected = _columns(ch, single_db, table)
        assert _columns(scratch, scratch_db, f"{table}_local") == expected, table
        assert _columns(scratch, scratch_db, table) == expected, f"{table} (Distributed)"
        assert _keys(scratch, scratch_db, f"{table}_local") == _keys(ch, single_db, table), table
        print(f"{table}: {len(expected)} columns, keys and TTL as single-node")
    print(f"{len(tables)} tables, {len(views)} materialized views mirrored")


def test_clustered_views_aggregate_like_single_node(ch: Any, scratch: Any) -> None:
    versions = _mirrored()  # the sink writes the columns of every migration (0005: `late`)
    migrate(ch, [m for v, m in _single().items() if v in versions])
    for version in versions:
        for statement in _clustered()[version].statements():
            scratch.command(_plain(statement))
    regions = [("ML", "ML-BKO"), ("FR", "FR-75C"), ("NL", "NL-NH")]
    records = [
        seizure(event_id=f"s-{i}", country=c, region=r, occurred_at=f"2026-03-{1 + i % 20:02d}T1{i % 10}:00:00Z")
        for i, (c, r) in ((i, regions[i % 3]) for i in range(120))
    ] + [lab(event_id=f"l-{i}", occurred_at=f"2026-04-{1 + i % 20:02d}T0{i % 10}:00:00Z") for i in range(80)]
    batch = Intake().process([RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)])
    sink = ClickHouseSink(ch)
    sink.store_events(batch.events)
    # Corrections (0012): a quantity, a substance and a region corrected; the retraction views must subtract alike.
    seven_grams = {"value": 7, "unit": "g"}
    fixes = [
        seizure(event_id="s-200", occurred_at="2026-03-01T10:00:00Z", corrects="s-0", quantity=seven_grams),
        seizure(event_id="s-201", occurred_at="2026-03-02T11:00:00Z", corrects="s-1", region="FR-IDF", country="FR"),
        lab(event_id="l-200", occurred_at="2026-04-01T00:00:00Z", corrects="l-0", substance={"name": "protonitazene"}),
    ]
    corrections = Intake().process([RawMessage(f"t:0:{200 + i}", json.dumps(r)) for i, r in enumerate(fixes)])
    named = {("agency:Douanes maliennes", "s-0"), ("agency:Douanes maliennes", "s-1"), ("lab:LAB-FR-01", "l-0")}
    known = known_reports(stored_reports(ch, sorted(named)), [], named)
    judged = judge_corrections(corrections.events, known, lambda claim: claim)
    assert len(judged.kept) == 3 and all(item.retracts is not None for item in judged.kept), judged.rejects
    assert sink.store_events(judged.kept).retractions == 3
    for table in ("lab_detections", "border_seizures", "retractions"):
        scratch.command(f"INSERT INTO {table}_local SELECT * FROM {ch.database}.{table}")
    first_last = "min(first_seen), max(last_seen), sum(reports)"
    recounts = {  # table: (group-by keys, aggregates)
        "reports_daily": ("day, country, region, kind, family, substance_key", "sum(reports), round(sum(grams), 6)"),
        "reports_hourly": ("hour, country, region, kind, family, substance_key", "sum(reports), round(sum(grams), 6)"),
        "substance_first_seen": ("substance_key", first_last),
        "substance_region_first_seen": (
            "substance_key, country, region",
            "min(first_seen), max(last_seen), sum(reports)",
        ),
    }
    for table, (keys, aggregates) in recounts.items():
        columns = f"{keys}, {aggregates}"
        single = ch.query(f"SELECT {columns} FROM {table} GROUP BY {keys} ORDER BY {keys}").result_rows
        clustered = scratch.query(f"SELECT {columns} FROM {table} GROUP BY {keys} ORDER BY {keys}").result_rows
        assert single and clustered == single, table
        print(f"{table}: {len(single)} aggregate rows equal on both layouts")
    # 200 reports and 3 corrections, each corrected report counted once (203 without the retractions).
    assert ch.query("SELECT sum(reports) FROM reports_daily").result_rows[0][0] == 200
    assert scratch.query("SELECT sum(reports) FROM reports_daily").result_rows[0][0] == 200
