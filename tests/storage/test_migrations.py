"""Versioned ClickHouse migrations on the real embedded engine."""

from __future__ import annotations

from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import ClickHouseError

from synthwatch.stream_apps.storage.clickhouse import (
    Migration,
    MigrationError,
    applied_migrations,
    available_migrations,
    migrate,
)


def _tables(ch: Any) -> set[str]:
    return {row[0] for row in ch.query("SHOW TABLES").result_rows}


def test_from_empty_then_rerun_is_a_no_op(ch: Any) -> None:
    shipped = available_migrations()
    assert shipped and [m.version for m in shipped] == sorted(m.version for m in shipped)
    applied = migrate(ch)
    assert [m.version for m in applied] == [m.version for m in shipped]
    assert {"lab_detections", "border_seizures", "rejects", "schema_migrations"} <= _tables(ch)
    assert migrate(ch) == []
    ledger = applied_migrations(ch)
    assert all(status == "applied" for _, _, status in ledger.values())


def test_half_applied_migration_is_refused_with_instructions(ch: Any) -> None:
    broken = Migration(1, "broken", "CREATE TABLE ok_table (x UInt8) ENGINE = MergeTree ORDER BY x;\nNOT SQL AT ALL;")
    with pytest.raises(ClickHouseError, match="Syntax error"):
        migrate(ch, [broken])
    assert "ok_table" in _tables(ch)  # the first statement ran: the state is half-applied
    with pytest.raises(MigrationError, match="started but not finished"):
        migrate(ch, [broken])


def test_edited_applied_migration_is_refused(ch: Any) -> None:
    migrate(ch, [Migration(1, "one", "CREATE TABLE a (x UInt8) ENGINE = MergeTree ORDER BY x")])
    with pytest.raises(MigrationError, match="never edit an applied migration"):
        migrate(ch, [Migration(1, "one", "CREATE TABLE a (y UInt8) ENGINE = MergeTree ORDER BY y")])


def test_statements_split_on_semicolons_at_line_end() -> None:
    migration = Migration(9, "x", "-- comment; not a split\nSELECT 1;\nSELECT ';' ;\n\nSELECT 3")
    assert migration.statements() == ["SELECT 1", "SELECT ';'", "SELECT 3"]
