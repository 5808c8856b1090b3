"""What a worker has loaded when its Faust worker starts, i.e. before it joins its consumer group.

Everything imported before the join is on the path to ready; the ClickHouse driver (clickhouse-connect,
chDB, and pandas through clickhouse-connect's insert) is imported by the thread that opens the engine while
the broker holds the join, and kafka-python is not needed by a worker before its first checkpoint. Checked
in a fresh interpreter: the test session itself has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json, sys, threading
from pathlib import Path

import faust

import synthwatch.cli.main  # what `synthwatch worker` imports before run_worker
from synthwatch.settings import Settings
from synthwatch.stack.worker import run_worker

seen = {}


def started(self):  # Faust's worker would start the app here: record what is loaded, and stop
    seen["modules"] = sorted(m for m in ("kafka", "clickhouse_connect", "chdb", "pandas") if m in sys.modules)
    seen["threads"] = sorted(t.name for t in threading.enumerate())
    raise SystemExit(0)


faust.Worker.execute_from_commandline = started
try:
    run_worker(Settings(data_dir=Path(sys.argv[1])), "127.0.0.1:9", announce=lambda message: None)
except SystemExit:
    pass
print(json.dumps(seen))
"""


def test_the_worker_starts_faust_before_it_loads_the_clickhouse_driver_or_kafka_python(tmp_path: Path) -> None:
    env_free = {"PATH": "/usr/bin:/bin"}  # no SYNTHWATCH_* from the caller's environment
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_free,
        cwd=tmp_path,  # not the checkout: `-c` puts the working directory first on sys.path
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["modules"] == [], f"imported before the Faust worker started: {seen['modules']}"
    assert "clickhouse-open" not in seen["threads"], "the engine began opening before the group join"
