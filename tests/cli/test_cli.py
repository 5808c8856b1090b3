"""Commands a user runs, as subprocesses, with the errors they see when something is missing."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.table import Table

from synthwatch.consoles import CommandConsole
from synthwatch.settings import Settings
from tests.conftest import cli_env, run_cli

LONG = "a-report-field-that-is-longer-than-any-terminal " * 8


def test_publish_without_a_broker_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "x.ndjson").write_text("{}\n")
    done = run_cli(Settings(data_dir=tmp_path), "publish", str(tmp_path / "x.ndjson"))
    assert done.returncode == 2  # an error: nothing was sent
    assert "synthwatch up" in done.stderr and "SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS" in done.stderr


def test_publish_of_a_missing_file(tmp_path: Path) -> None:
    done = run_cli(Settings(data_dir=tmp_path, kafka_bootstrap_servers="127.0.0.1:1"), "publish", "nope.ndjson")
    assert done.returncode == 2 and "no such file" in done.stderr


def test_db_migrate_is_idempotent_on_a_fresh_engine(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = run_cli(settings, "db", "migrate")
    assert first.returncode == 0, first.stderr
    assert "0001_raw_events" in first.stdout
    second = run_cli(settings, "db", "migrate")
    assert second.returncode == 0 and "nothing (up to date)" in second.stdout


def test_sql_refuses_writes(tmp_path: Path) -> None:
    assert run_cli(Settings(data_dir=tmp_path), "db", "migrate").returncode == 0
    done = run_cli(Settings(data_dir=tmp_path), "sql", "DROP TABLE rejects")
    assert done.returncode == 1 and "only a single SELECT" in done.stderr


def test_schemas_check_passes_on_the_committed_files(tmp_path: Path) -> None:
    done = run_cli(Settings(data_dir=tmp_path), "schemas", "check")
    assert done.returncode == 0, done.stderr


def test_settings_point_at_a_cluster_through_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    monkeypatch.setenv("SYNTHWATCH_CLICKHOUSE_URL", "http://user:pass@clickhouse:8123/synthwatch")
    monkeypatch.setenv("SYNTHWATCH_PARTITIONS", "12")
    settings = Settings()
    assert settings.kafka_bootstrap_servers == "broker:9092"
    assert settings.resolved_clickhouse_url.startswith("http://") and not settings.clickhouse_is_embedded
    assert settings.partitions == 12
    from synthwatch.stream_apps.storage.clickhouse import database_of

    assert database_of(settings) == "synthwatch"


def test_piped_output_keeps_lines_whole_whatever_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "30")  # a narrow terminal around the process must not matter
    out = io.StringIO()
    console = CommandConsole(file=out)
    table = Table("kind", "summary")
    table.add_row("new_substance", LONG.strip())
    console.print(f"wrote {LONG.strip()}")
    console.print(table)
    lines = out.getvalue().splitlines()
    assert f"wrote {LONG.strip()}" in lines
    assert any("new_substance" in line and LONG.strip() in line for line in lines)  # the cell is on one line
    assert max(len(line) for line in lines) < len(LONG) + 40  # the table takes only the width it needs


def test_a_terminal_still_gets_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "30")
    out = io.StringIO()
    CommandConsole(file=out, force_terminal=True).print(LONG.strip())
    assert max(len(line) for line in out.getvalue().splitlines()) <= 30


def test_a_command_piped_with_a_narrow_columns_prints_whole_values(tmp_path: Path) -> None:
    assert run_cli(Settings(data_dir=tmp_path), "db", "migrate").returncode == 0  # reads need an engine
    done = subprocess.run(
        [sys.executable, "-m", "synthwatch.cli.main", "sql", f"SELECT '{LONG.strip()}' AS summary"],
        env=cli_env(Settings(data_dir=tmp_path), COLUMNS="40"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert LONG.strip() in done.stdout
