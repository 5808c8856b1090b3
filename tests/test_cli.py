"""Commands a user runs, as subprocesses, with the errors they see when something is missing."""

from __future__ import annotations

from pathlib import Path

from synthwatch.settings import Settings

from .conftest import run_cli


def test_publish_without_a_broker_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "x.ndjson").write_text("{}\n")
    done = run_cli(Settings(data_dir=tmp_path), "publish", str(tmp_path / "x.ndjson"))
    assert done.returncode == 1
    assert "synthwatch up" in done.stderr and "SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS" in done.stderr


def test_publish_of_a_missing_file(tmp_path: Path) -> None:
    done = run_cli(Settings(data_dir=tmp_path, kafka_bootstrap_servers="127.0.0.1:1"), "publish", "nope.ndjson")
    assert done.returncode == 1 and "no such file" in done.stderr


def test_db_migrate_is_idempotent_on_a_fresh_engine(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = run_cli(settings, "db", "migrate")
    assert first.returncode == 0, first.stderr
    assert "0001_raw_events" in first.stdout
    second = run_cli(settings, "db", "migrate")
    assert second.returncode == 0 and "nothing (up to date)" in second.stdout


def test_sql_refuses_writes(tmp_path: Path) -> None:
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
    from synthwatch.clickhouse import database_of

    assert database_of(settings) == "synthwatch"
