"""`synthwatch up` as a user runs it: starts everything, answers queries, stops only what it started."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from synthwatch.broker import EmbeddedBroker
from synthwatch.settings import Settings

from .conftest import ndjson, run_cli, start_worker, stop_worker, wait_until
from .factories import seizure

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_commands_and_stops_cleanly(tmp_path: Path, sig: int) -> None:
    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    bystander = EmbeddedBroker(settings).start()  # a broker `up` did not start must survive it
    try:
        up = start_worker(settings, tmp_path / "up.log", command="up")
        info = up.info
        assert info.broker_pid and _alive(info.broker_pid)
        print(f"worker ready in {info.ready_seconds:.2f} s after `synthwatch up` started")

        (tmp_path / "one.ndjson").write_text(ndjson([seizure(event_id="up-1")]))
        published = run_cli(settings, "publish", str(tmp_path / "one.ndjson"))  # finds the broker via stack.json
        assert published.returncode == 0, published.stderr
        wait_until(lambda: up.count("SELECT count() FROM border_seizures") == 1, 60, "the event")
        status = run_cli(settings, "status")
        assert json.loads(status.stdout)["bootstrap_servers"] == info.bootstrap_servers
        shown = run_cli(settings, "sql", "SELECT region, count() AS n FROM border_seizures GROUP BY region")
        assert shown.returncode == 0 and "ML-BKO" in shown.stdout

        assert stop_worker(up, sig) == 0, (tmp_path / "up.log").read_text()[-2000:]
        wait_until(lambda: not _alive(info.broker_pid), 10, "the broker `up` started to exit")
        assert not (settings.data_dir / "stack.json").exists()
        assert bystander.process is not None and bystander.process.poll() is None
    finally:
        bystander.stop()


def test_engine_is_readable_after_the_stack_stopped(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    up = start_worker(settings, tmp_path / "up.log", command="up")
    (tmp_path / "one.ndjson").write_text(ndjson([seizure(event_id=f"keep-{i}") for i in range(3)]))
    assert run_cli(settings, "publish", str(tmp_path / "one.ndjson")).returncode == 0
    wait_until(lambda: up.count("SELECT count() FROM border_seizures") == 3, 60, "three events")
    stop_worker(up)
    time.sleep(0.2)
    shown = run_cli(settings, "sql", "SELECT count() FROM border_seizures")  # opens the engine directly now
    assert shown.returncode == 0, shown.stderr
    assert "│ 3 " in shown.stdout.replace("┃", "│")
