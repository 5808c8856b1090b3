"""What a worker has loaded and done when its Faust worker starts, i.e. before it joins its consumer group.

Everything imported before the join is on the path to ready; the ClickHouse driver (clickhouse-connect,
chDB; pandas not at all since ``storage.clickhouse.without_dataframes``) is imported by the thread that
opens the engine while the broker holds the join, and kafka-python is not needed by a worker before its
first checkpoint. The resolver's catalogue and one garbage collection are left for the join wait too
(:class:`JoinWaitWork`).
Checked in a fresh interpreter: the test session itself has imported everything.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest

from synthwatch.stack.worker import JoinWaitWork, settle_start_up_objects

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


# Through `synthwatch worker` (the command line), up to where Faust's worker would start.
_CLI_PROBE = """
import gc, json, sys, threading

import faust
import faust.app.base
import faust.utils.venusian

from synthwatch.cli.main import app
from synthwatch.stream_apps.detect.identity import SubstanceResolver

seen = {}
resolvers = []
made = SubstanceResolver.__init__


def remember(self, *args, **kwargs):
    made(self, *args, **kwargs)
    resolvers.append(self)


def started(self):  # Faust's worker would start the app here: record what is done, and stop
    seen["automatic_gc"] = gc.isenabled()
    seen["threads"] = sorted(t.name for t in threading.enumerate())
    seen["catalogued"] = [r.resolve("Mephedrone").catalogued for r in resolvers]
    seen["discovery_marks"] = faust.app.base.venusian is faust.utils.venusian  # Faust's web views come next
    raise SystemExit(0)


SubstanceResolver.__init__ = remember
faust.Worker.execute_from_commandline = started
try:
    app(["worker"])
except SystemExit:
    pass
seen["automatic_gc_after"] = gc.isenabled()
print(json.dumps(seen))
"""


def test_synthwatch_worker_leaves_the_catalogue_and_the_collection_for_the_join_wait_and_marks_nothing(
    tmp_path: Path,
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "SYNTHWATCH_DATA_DIR": str(tmp_path / "data"),
        "SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", _CLI_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["catalogued"] == [False], "the resolver indexed its catalogue before the group join"
    assert "join-wait-work" not in seen["threads"], "the join-wait work began before the group join"
    assert seen["automatic_gc"] is False, "automatic collections ran while the worker started"
    assert seen["discovery_marks"] is False, "Faust's web server would mark its views for autodiscovery"
    assert seen["automatic_gc_after"] is True, "a worker that stopped before its join left collections off"


def test_join_wait_work_runs_its_steps_in_order_in_its_own_thread_once_started() -> None:
    ran: list[tuple[str, str]] = []
    work = JoinWaitWork()
    work.add(lambda: ran.append(("first", threading.current_thread().name)))
    work.add(lambda: ran.append(("second", threading.current_thread().name)))
    assert work.failed() is None and ran == []  # nothing runs before start
    work.start()
    work.start()  # a later revocation finds it started
    asyncio.run(work.done())
    work.join()
    assert ran == [("first", "join-wait-work"), ("second", "join-wait-work")]
    assert work.failed() is None
    with pytest.raises(RuntimeError, match="after it started"):
        work.add(lambda: None)


def test_join_wait_work_that_fails_raises_its_error_to_whoever_waits_and_runs_no_later_step() -> None:
    ran: list[str] = []

    def broken() -> None:
        raise ValueError("catalogue entry 'X': SMILES not parseable by RDKit")

    work = JoinWaitWork()
    work.add(broken)
    work.add(lambda: ran.append("later"))
    work.start()
    with pytest.raises(ValueError, match="catalogue entry 'X'"):
        asyncio.run(work.done())
    assert isinstance(work.failed(), ValueError)
    assert ran == []


def test_join_wait_work_never_started_has_nothing_to_join_or_report() -> None:
    work = JoinWaitWork()
    work.add(lambda: None)
    work.join()  # a worker stopped before its group join
    assert work.failed() is None


@pytest.mark.parametrize("freeze", [True, False])
def test_settling_start_up_objects_collects_freezes_as_configured_and_turns_collection_on(freeze: bool) -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self  # only the collector frees it

    frozen_before = gc.get_freeze_count()
    gc.disable()
    try:
        garbage = Cycle()
        collected = threading.Event()
        weakref.finalize(garbage, collected.set)
        del garbage
        settle_start_up_objects(freeze=freeze)
        assert collected.is_set(), "start-up's garbage was not collected"
        assert gc.isenabled()
        assert (gc.get_freeze_count() > frozen_before) is freeze
    finally:
        gc.unfreeze()  # this test session's objects go back to the collector
        gc.enable()
