"""`synthwatch up` as a user runs it: starts everything, answers queries, stops only what it started."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import pytest

from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker
from tests.conftest import (
    RunningWorker,
    cli_env,
    isolated_settings,
    ndjson,
    run_cli,
    start_worker,
    stop_worker,
    wait_until,
)
from tests.support.factories import seizure
from tests.support.stop_faults import UNDER_WAY

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
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
    through_stack = run_cli(settings, "stats", "--days", "3650", "--format", "json")  # over the stack's /sql
    assert through_stack.returncode == 0, through_stack.stderr
    assert [(r["region"], r["reports"], r["border_seizures"]) for r in json.loads(through_stack.stdout)] == [
        ("ML-BKO", 3, 3)
    ]
    stop_worker(up)
    time.sleep(0.2)
    shown = run_cli(settings, "sql", "SELECT count() FROM border_seizures")  # opens the engine directly now
    assert shown.returncode == 0, shown.stderr
    assert "│ 3 " in shown.stdout.replace("┃", "│")
    # up.log is a file, not a terminal: each announcement is one line however long (no wrap at 80 columns)
    log = (tmp_path / "up.log").read_text().splitlines()
    topics = [line for line in log if line.startswith("Topics: ")]
    assert len(topics) == 1 and topics[0].endswith(")") and len(topics[0]) > 80, topics
    assert any(line.startswith("Stopping: ") and line.endswith("loses it.") for line in log), log


# --- stopping without losing what the in-memory broker accepted (issue 11, section 4) -------------------------


def _publish_month(settings: Settings, servers: str, tmp_path: Path, days: int = 10) -> int:
    """Publish a simulated stream to ``servers``; returns how many events the broker accepted."""
    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import read_records
    from synthwatch.producers.simulate import SimulationConfig, simulate

    path = tmp_path / "stream.ndjson"
    simulate(SimulationConfig(days=days, seed=4, start=date(2026, 3, 1))).write(path)
    with Publisher(settings, servers) as publisher:
        summary = publisher.publish_records(read_records(str(path)))
    assert summary.sent > 1000 and not summary.failed
    return summary.sent


def _accounted_for(settings: Settings) -> int:
    """Events stored, plus those refused as too late (stored in rejects with the reason), read from the
    engine directly: the stack has stopped, so this process opens it."""
    done = run_cli(
        settings,
        "sql",
        "SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures) "
        "+ (SELECT count() FROM rejects WHERE stage = 'detection') AS n",
    )
    assert done.returncode == 0, done.stderr
    return int(re.findall(r"│ (\d+) ", done.stdout.replace("┃", "│"))[-1])


@contextmanager
def running_up(
    settings: Settings, log: Path, module: tuple[str, ...] = ("synthwatch.cli.main",)
) -> Iterator[RunningWorker]:
    """`synthwatch up` for one test; killed if the test leaves it running (its broker dies with it).

    ``module``: run through a module of tests.support instead (see :func:`start_worker`)."""
    up = start_worker(settings, log, command="up", module=module)
    try:
        yield up
    finally:
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGCONT)
            up.process.kill()
            up.process.wait(30)


def _wait_log(path: Path, text: str, timeout: float = 60) -> None:
    wait_until(lambda: text in path.read_text(errors="replace"), timeout, f"{text!r} in {path.name}")


def test_ctrl_c_right_after_publishing_stores_every_accepted_event(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    log = tmp_path / "up.log"
    with running_up(settings, log) as up:
        sent = _publish_month(settings, up.info.bootstrap_servers, tmp_path)
        up.process.send_signal(signal.SIGINT)  # at once: most of the stream is still in the broker's memory
        assert up.process.wait(120) == 0, log.read_text()[-3000:]
        text = log.read_text()
        print("\n".join(line for line in text.splitlines() if line.startswith(("Stopping", "Draining", "Drained"))))
        assert "Drained in" in text and "Not stored" not in text
        assert up.info.broker_pid and not _alive(up.info.broker_pid)
        assert _accounted_for(settings) == sent


def _unread_from(pid: int, port: int) -> int:
    """Bytes that arrived on ``pid``'s TCP connections to ``port`` and that it has not read yet."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    unread = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    unread += int(fields[4].split(":")[1], 16)
    return unread


#: Unread bytes that can only be a fetch answered with records (a heartbeat, metadata or empty fetch
#: answer is well below this; a fetch of the published stream is hundreds of kilobytes).
FETCHED_RECORDS = 64 * 1024


def _hand_over_a_fetch(up: RunningWorker, port: int) -> None:
    """With ``up`` stopped and records published: have the broker answer a fetch of ``up``'s worker with
    records that the worker has not read yet (it reads them once it continues, whatever the broker does).

    A fetch is in flight when ``up`` stops most of the time, but the broker answers it at the end of its
    wait (50 ms), before the records are published; so ``up`` is let run for a moment (it reads that
    answer and asks again) and stopped again, until an answer with records waits in its socket.
    """
    for attempt in range(200):
        deadline = time.monotonic() + 0.5  # the broker answers a fetch within its wait, 50 ms
        while (unread := _unread_from(up.process.pid, port)) < FETCHED_RECORDS and time.monotonic() < deadline:
            time.sleep(0.02)
        if unread >= FETCHED_RECORDS:
            print(f"a fetch with records waits unread after {attempt} resumes")
            return
        up.process.send_signal(signal.SIGCONT)
        time.sleep(0.005 * (1 + attempt % 4))  # a moment to read the answer and ask again
        up.process.send_signal(signal.SIGSTOP)
    unread = _unread_from(up.process.pid, port)
    pytest.fail(f"the broker never answered a fetch of the stopped worker with records ({unread} bytes unread)")


@pytest.mark.parametrize(
    ("how", "fetched"),
    [
        ("second signal", None),
        ("timeout", None),
        ("timeout", "cut"),
        ("timeout", "abandoned"),
    ],
    ids=["second signal", "timeout", "timeout, fetched", "timeout, fetched, insert outlives the stop"],
)
def test_a_stop_that_cannot_drain_counts_what_was_lost(tmp_path: Path, how: str, fetched: str | None) -> None:
    """A second Ctrl-C, or the drain's time limit, stops `up` with events unstored; it says how many.

    Nothing can be committed while the broker is frozen (SIGSTOP), so the loss is certain, not a race. But
    a fetch the broker answered before it froze can be read by the worker after: it stores those records
    as it stops (once the broker continues), and may not commit them. They are stored, not lost: the count
    must not say otherwise (``fetched`` forces that case; without it, it may happen).

    How ``fetched`` forces it: the worker reads the fetch while the broker is frozen, and its checkpoint of
    those records can store nothing until the broker answers (it first waits for the acknowledgement of the
    sightings they produced); the test waits for a checkpoint of input records to be under way, broker
    frozen, and lets the broker continue only once the stop has begun. What then happens to the records is
    decided inside the stop, in milliseconds, and several outcomes are right (stored and committed; stored,
    not committed, not counted as lost); ``up`` runs through ``tests.support.stop_faults``, whose fault
    ``cut`` fixes the order that leaves them stored and not committed, and ``abandoned`` the one where their
    insert ends only after the stop cancelled the coroutine waiting for it and closed the loop.
    """
    timeout = {"drain_timeout_seconds": 0} if how == "timeout" else {}
    settings = Settings(data_dir=tmp_path / "data", web_port=0, **timeout)
    log = tmp_path / "up.log"
    module = ("tests.support.stop_faults", fetched) if fetched else ("synthwatch.cli.main",)
    with running_up(settings, log, module) as up:
        broker_pid = up.info.broker_pid
        assert broker_pid
        up.process.send_signal(signal.SIGSTOP)  # the worker takes nothing while we publish
        try:
            sent = _publish_month(settings, up.info.bootstrap_servers, tmp_path, days=4)
            if fetched:
                _hand_over_a_fetch(up, int(up.info.bootstrap_servers.rsplit(":", 1)[1]))
            os.kill(broker_pid, signal.SIGSTOP)
        finally:
            up.process.send_signal(signal.SIGCONT)
        try:
            if fetched:  # the worker has read the fetch and holds its records in a checkpoint, broker frozen
                _wait_log(log, UNDER_WAY)
            up.process.send_signal(signal.SIGINT)
            _wait_log(log, "Stopping: storing what the broker holds first")
            if how == "second signal":
                up.process.send_signal(signal.SIGINT)
                _wait_log(log, "Stopping now")
            else:
                _wait_log(log, "Gave up draining after 0 s")
            if fetched:  # the broker continues into a stop, not into a worker that would commit the records
                _wait_log(log, "[^-App]: Stopping...")
        finally:
            os.kill(broker_pid, signal.SIGCONT)  # the count after the stop needs it
        assert up.process.wait(120) == 3, log.read_text()[-3000:]
        text = log.read_text()
        shown = ("Stopping", "Gave up", "Not stored", "stored but not committed")
        print("\n".join(line for line in text.splitlines() if line.startswith(shown) or shown[-1] in line))
        found = re.search(r"Not stored: ([\d,]+) records: ([\d,]+) reports", text)
        assert found, text[-3000:]
        lost, reports = (int(n.replace(",", "")) for n in found.groups())
        reason = "stopped by a second signal" if how == "second signal" else "gave up draining after 0 s"
        assert re.search(rf"error: {lost:,} accepted records were not stored \({reason}\)", text)
        # Something is always lost (the reports, or the sightings of those fetched, which no one could
        # commit); the reports said lost are exactly those that are not stored.
        assert lost > 0 and _accounted_for(settings) + reports == sent
        if fetched:  # the fetched records are in ClickHouse, not committed, and said so
            assert "stored but not committed at stop" in text
        assert not _alive(broker_pid)


def test_the_broker_dies_with_a_killed_up(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    with running_up(settings, tmp_path / "up.log") as up:
        broker_pid = up.info.broker_pid
        assert broker_pid and _alive(broker_pid)
        up.process.kill()
        up.process.wait(10)
        wait_until(lambda: not _alive(broker_pid), 10, "the broker of a SIGKILLed `up` to exit")


def test_up_stops_a_broker_an_earlier_up_left_running(tmp_path: Path) -> None:
    """As a broker started before brokers died with their `up` (or by a build without it) was left."""
    from synthwatch.stackfile import StackInfo, write_stack

    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    orphan = EmbeddedBroker(settings).start()  # not tied to this process, like the old ones
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert orphan.process is not None
    orphan_pid = orphan.process.pid
    write_stack(
        settings,
        StackInfo(gone.pid, orphan.bootstrap_servers, "http://127.0.0.1:1", "chdb://x", "2026-01-01", None, orphan_pid),
    )
    try:
        with running_up(settings, tmp_path / "up.log") as up:
            assert (
                f"Stopped the broker (pid {orphan_pid}, {orphan.bootstrap_servers})"
                in (tmp_path / "up.log").read_text()
            )
            assert orphan.process.wait(10) is not None  # it was stopped (and is reaped here, its parent)
            assert stop_worker(up, signal.SIGINT) == 0
    finally:
        orphan.stop()


def test_up_leaves_a_process_that_only_looks_like_its_broker(tmp_path: Path) -> None:
    """The pid in a stale stack file may be anything by now: only our Tansu on its address is stopped."""
    from synthwatch.stackfile import StackInfo, write_stack

    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    stranger = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_stack(settings, StackInfo(gone.pid, "127.0.0.1:9", "http://x", "chdb://x", "2026-01-01", None, stranger.pid))
    try:
        with running_up(settings, tmp_path / "up.log") as up:
            assert stranger.poll() is None
            assert stop_worker(up, signal.SIGINT) == 0
    finally:
        stranger.kill()
        stranger.wait()


def test_a_broker_whose_port_another_process_took_fails_instead_of_serving_the_other_listener(tmp_path: Path) -> None:
    """Something answering on the port is not proof that it is this Tansu: another process can take the port
    between its pick and Tansu's bind (two test processes, a restart on the same port). Tansu then exits;
    before, its start returned as soon as the other listener accepted, and clients talked to that one."""
    from synthwatch.stack.broker import BrokerError, listens

    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        assert listens(os.getpid(), "127.0.0.1", port) is True  # what the check reads: this process holds it
        with pytest.raises(BrokerError, match=f"is 127.0.0.1:{port} taken by another process"):
            EmbeddedBroker(Settings(), port=port, log_path=tmp_path / "tansu.log").start()
    with EmbeddedBroker(Settings(), log_path=tmp_path / "tansu.log") as running:
        assert running.process is not None and listens(running.process.pid, running.host, running.port) is True


def test_a_second_up_says_one_line_and_fails(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", web_port=0)
    with running_up(settings, tmp_path / "up.log") as up:
        again = run_cli(settings, "up", timeout=60)
        assert again.returncode == 1
        assert again.stdout == "" and "Traceback" not in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1, again.stderr
        assert (
            f"a stack is already running, pid {up.info.pid}, broker {up.info.bootstrap_servers} "
            f"(pid {up.info.broker_pid})" in again.stderr
        )
        assert up.process.poll() is None and up.info.broker_pid and _alive(up.info.broker_pid)
        assert stop_worker(up, signal.SIGINT) == 0


def test_a_busy_web_port_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(data_dir=tmp_path / "data", web_port=port)
        done = run_cli(settings, "up", timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"127.0.0.1:{port} is in use" in done.stderr and "SYNTHWATCH_WEB_PORT" in done.stderr
    assert not (tmp_path / "data" / "tansu.log").exists()  # it stopped before starting a broker


_BREAK_THE_LEDGER = """
from clickhouse_connect.driver.exceptions import ClickHouseError
from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.clickhouse import Migration, connect, migrate
broken = Migration(1, "broken", "CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x;\\nNOT SQL;")
try:
    migrate(connect(Settings()), [broken])
except ClickHouseError:
    print("half-applied")
"""


def test_a_worker_whose_migrations_fail_stops_with_their_error_and_is_never_ready(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """ClickHouse opens and migrates in a thread while the worker joins its group: a failure there must
    still stop the worker with the migration's message, before it reports ready."""
    settings = isolated_settings(broker, tmp_path / "data")
    broken = subprocess.run(
        [sys.executable, "-c", _BREAK_THE_LEDGER], env=cli_env(settings), capture_output=True, text=True, timeout=120
    )
    assert broken.stdout.strip() == "half-applied", broken.stderr
    done = run_cli(settings, "worker", timeout=120)
    assert done.returncode != 0
    said = " ".join(done.stderr.split())  # however the traceback's renderer wraps it
    assert "MigrationError: migration 0001_broken was started but not finished" in said, done.stderr[-3000:]
    assert "Worker ready" not in done.stdout
    assert not (settings.data_dir / "stack.json").exists()
