"""Versioned ClickHouse migrations on the real embedded engine."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any, cast

import pytest
from clickhouse_connect.driver.exceptions import ClickHouseError

from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.clickhouse import (
    Migration,
    MigrationError,
    OpeningClient,
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


def test_opening_in_a_thread_migrates_and_every_use_waits_for_it(ch: Any, ch_settings: Settings) -> None:
    """The worker opens ClickHouse in a thread while it joins its group: the client it hands out is usable at
    once (a use waits for the opening), and the migrations are applied when it is."""
    reported: list[list[Migration]] = []
    client = OpeningClient(ch_settings, on_migrated=reported.append)
    try:
        tables = {row[0] for row in client.query("SHOW TABLES").result_rows}  # waits for the opening
        assert {"lab_detections", "border_seizures", "rejects", "schema_migrations"} <= tables
        assert [[m.version for m in applied] for applied in reported] == [[m.version for m in available_migrations()]]
        assert asyncio.run(client.opened()) is client.result()
        assert client.failed() is None
    finally:
        client.close()
    assert migrate(ch) == []  # applied by the opening, nothing left


def test_a_failed_opening_is_raised_by_every_use_and_by_opened(ch: Any, ch_settings: Settings) -> None:
    """A worker whose migrations cannot run must stop with that error, not run without its tables."""
    with pytest.raises(ClickHouseError):
        migrate(
            ch, [Migration(1, "broken", "CREATE TABLE ok_table (x UInt8) ENGINE = MergeTree ORDER BY x;\nNOT SQL;")]
        )
    client = OpeningClient(ch_settings)
    with pytest.raises(MigrationError, match="started but not finished"):
        client.query("SELECT 1")
    with pytest.raises(MigrationError, match="started but not finished"):
        asyncio.run(client.opened())
    assert isinstance(client.failed(), MigrationError)
    client.close()  # nothing to close: the opening closed its client when the migrations failed


def test_a_stop_while_the_engine_opens_cancels_the_waiters_not_the_opening(ch: Any, ch_settings: Settings) -> None:
    """A worker stopped in its first seconds cancels the task awaiting ``opened`` (its recovery). That must not
    cancel the opening itself: it made the opening thread fail, left the client it opened unclosed, and
    made ``close`` raise CancelledError (a traceback and exit code 1 instead of a clean stop)."""
    client = OpeningClient(ch_settings, start=False)  # the opening starts only after the waiter is cancelled

    async def stop_while_waiting() -> None:
        waiter = asyncio.ensure_future(client.opened())
        await asyncio.sleep(0)  # the waiter is now awaiting the opening
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(stop_while_waiting())
    client.start()
    opened = client.result()  # the opening went on and worked
    assert client.failed() is None
    assert opened.query("SELECT 1").result_rows == [(1,)]
    client.close()
    assert migrate(ch) == []


def test_opening_without_migrations_only_opens(ch: Any, ch_settings: Settings) -> None:
    client = OpeningClient(ch_settings, apply_migrations=False)
    try:
        assert "schema_migrations" not in {row[0] for row in client.query("SHOW TABLES").result_rows}
    finally:
        client.close()


def test_the_ledger_records_each_migration_started_then_applied_with_its_values_bound(ch: Any) -> None:
    """Ledger rows go in as ``INSERT ... SELECT`` of bound parameters (not ``client.insert``, which imports
    pandas): a name with quotes and backslashes is stored as it is, never spliced into the SQL."""
    awkward = Migration(1, "it's a \\ 'name'", "CREATE TABLE quoted_ok (x UInt8) ENGINE = MergeTree ORDER BY x")
    migrate(ch, [awkward])
    rows = ch.query("SELECT version, name, checksum, toString(status) FROM schema_migrations ORDER BY at, status")
    assert rows.result_rows == [
        (1, awkward.name, awkward.checksum, "started"),
        (1, awkward.name, awkward.checksum, "applied"),
    ]
    assert applied_migrations(ch) == {1: (awkward.name, awkward.checksum, "applied")}
    assert migrate(ch, [awkward]) == []


def test_a_started_and_applied_row_in_the_same_millisecond_read_as_applied(ch: Any) -> None:
    applied_migrations(ch)  # creates the ledger
    at = "'2026-01-01 00:00:00.000'"  # both rows of a migration in the same millisecond, in either order
    ch.command(
        "INSERT INTO schema_migrations (version, name, checksum, status, at) VALUES "
        f"(1, 'one', 'abc', 'started', {at}), (1, 'one', 'abc', 'applied', {at}), "
        f"(2, 'two', 'def', 'applied', {at}), (2, 'two', 'def', 'started', {at})"
    )
    assert applied_migrations(ch) == {1: ("one", "abc", "applied"), 2: ("two", "def", "applied")}


def test_migrating_a_fresh_directory_does_not_import_pandas(tmp_path: Any) -> None:
    """pandas costs ~0.2 core-s and ~0.3 s to import: not on the start-up path of the worker's opening or of
    ``ingest-history`` (clickhouse-connect's ``insert`` imported it for the ledger rows)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from synthwatch.settings import Settings\n"
        "from synthwatch.stream_apps.storage.clickhouse import connect, migrate\n"
        "client = connect(Settings(data_dir=Path(sys.argv[1])))\n"
        "assert migrate(client)\n"
        "client.close()\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_0015_on_deliveries_stored_before_it_defaults_them_and_counts_them_against_nobody(ch: Any) -> None:
    """Migration 0015 on a database with deliveries: the rows a worker of 0014 wrote read no reporter and budget day
    1970-01-01 (the immediate budget counts them against nobody), their digest queue is intact, and a new worker's
    rows store both columns; migrating again changes nothing."""
    from datetime import UTC, date, datetime

    from synthwatch.stream_apps.storage.deliveries import DeliveryStore
    from synthwatch.stream_apps.storage.tables import DELIVERY_COLUMNS, NO_DAY, Attempt

    assert [m.version for m in migrate(ch, [m for m in available_migrations() if m.version <= 14])][-1] == 14
    at = datetime(2026, 12, 7, 9, 30, tzinfo=UTC)
    old_columns = [c for c in DELIVERY_COLUMNS if c not in ("reported_by", "budget_day")]

    def old_row(alert_id: str, status: str, attempt: int) -> list[Any]:
        row = Attempt(
            alert_id,
            "ml-bko",
            "hook",
            "webhook",
            "r",
            attempt,
            cast(Any, status),
            "why",
            200,
            "t",
            at,
            1.0,
            alert_type="new_substance",
            alert_json="{}" if status == "queued_digest" else "",
        )
        return [getattr(row, c) for c in old_columns]

    rows = [old_row("A-1", "delivered", 1), old_row("A-2", "queued_digest", 0)]
    ch.insert("deliveries", rows, column_names=old_columns)  # as the worker of 0014 wrote them
    assert [m.version for m in migrate(ch)] == [15]
    assert migrate(ch) == []
    assert ch.query("SELECT alert_id, reported_by, budget_day FROM deliveries ORDER BY alert_id").result_rows == [
        ("A-1", [], NO_DAY),
        ("A-2", [], NO_DAY),
    ]
    store = DeliveryStore(ch)
    keys = [("ml-bko", "", NO_DAY), ("ml-bko", "LAB-1", date(2026, 12, 7))]
    assert store.immediate_alerts(keys, ["new_substance"]) == {}  # counted against nobody
    (queued,) = store.pending_digests(at)
    assert (queued.alert_id, queued.reason) == ("A-2", "why")
    new = Attempt(
        "A-3",
        "ml-bko",
        "hook",
        "webhook",
        "r",
        1,
        "delivered",
        "",
        200,
        "t",
        at,
        1.0,
        alert_type="new_substance",
        reported_by=["LAB-1"],
        budget_day=date(2026, 12, 7),
    )
    store.record([new])
    assert store.immediate_alerts(keys, ["new_substance"]) == {("ml-bko", "LAB-1", date(2026, 12, 7)): {"A-3"}}
