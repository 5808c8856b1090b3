"""``SYNTHWATCH_CLICKHOUSE_ENGINE_PROCESS``: ``synthwatch up`` with the embedded engine in a process of its own.

What must hold: the worker's process carries no engine (its RSS is what the setting is for); commands that
read the data (``sql``, ``stats``: through the worker's ``/sql``) work as before; the engine's password
appears in no log, no ``stack.json`` and no command's output; stopping ``up``, or killing it, leaves no
process holding the engine's directory, which a later command opens directly.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.engine_server import PASSWORD_ENV
from tests.conftest import ndjson, run_cli, start_worker, stop_worker, wait_until
from tests.support.factories import seizure

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except OSError:
        return False


def _maps_chdb(pid: int) -> bool:
    """Whether the process has chDB's library mapped (the engine's code): its file's name, not the whole path (a
    checkout under a directory named after chDB maps every one of its files under a path with "chdb" in it)."""
    mapped = (line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/" in line)
    return any(Path(path).name.startswith("_chdb.") for path in mapped)


def _engine_pid(log: Path) -> int:
    match = re.search(r"in a process of its own \(pid (\d+),", log.read_text())
    assert match, log.read_text()[-2000:]
    return int(match.group(1))


def test_up_with_the_engine_process_serves_commands_and_leaves_nothing_behind(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", web_port=0, clickhouse_engine_process=True)
    up = start_worker(settings, tmp_path / "up.log", command="up")
    engine = _engine_pid(tmp_path / "up.log")
    assert _alive(engine) and _maps_chdb(engine)
    assert not _maps_chdb(up.process.pid), "the worker's process loaded the engine"
    password = dict(
        item.split("=", 1) for item in Path(f"/proc/{engine}/environ").read_text().split("\0") if "=" in item
    )[PASSWORD_ENV]

    (tmp_path / "one.ndjson").write_text(ndjson([seizure(event_id=f"ep-{i}") for i in range(3)]))
    published = run_cli(settings, "publish", str(tmp_path / "one.ndjson"))
    assert published.returncode == 0, published.stderr
    wait_until(lambda: up.count("SELECT count() FROM border_seizures") == 3, 60, "three events")
    shown = run_cli(settings, "sql", "SELECT region, count() AS n FROM border_seizures GROUP BY region")
    assert shown.returncode == 0 and "ML-BKO" in shown.stdout, shown.stderr
    stats = run_cli(settings, "stats", "--days", "3650", "--format", "json")
    assert stats.returncode == 0, stats.stderr
    assert [(r["region"], r["reports"]) for r in json.loads(stats.stdout)] == [("ML-BKO", 3)]
    # the analyst path stays read-only through the engine process too
    refused = run_cli(settings, "sql", "INSERT INTO border_seizures (event_id) VALUES ('x')")
    assert refused.returncode != 0
    status = run_cli(settings, "status")
    stack_file = (settings.data_dir / "stack.json").read_text()
    assert stop_worker(up) == 0, (tmp_path / "up.log").read_text()[-2000:]
    wait_until(lambda: not _alive(engine), 30, "the engine process to exit with `up`")
    for what, text in {
        "up.log": (tmp_path / "up.log").read_text(),
        "engine.log": (settings.data_dir / "engine.log").read_text(),
        "stack.json": stack_file,
        "status": status.stdout + status.stderr,
        "sql": shown.stdout + shown.stderr + refused.stdout + refused.stderr,
    }.items():
        assert password not in text, what

    time.sleep(0.2)
    direct = run_cli(settings, "sql", "SELECT count() FROM border_seizures")  # the directory is free again
    assert direct.returncode == 0, direct.stderr
    assert "│ 3 " in direct.stdout.replace("┃", "│")


def test_the_engine_process_dies_with_a_killed_up(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", web_port=0, clickhouse_engine_process=True)
    up = start_worker(settings, tmp_path / "up.log", command="up")
    engine = _engine_pid(tmp_path / "up.log")
    assert _alive(engine)
    stop_worker(up, signal.SIGKILL)
    wait_until(lambda: not _alive(engine), 10, "the engine process of a SIGKILLed `up` to exit")
