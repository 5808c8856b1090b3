"""StackProcess: a child that is ready once its stack.json says so, errors that name the log, SIGTERM then SIGKILL.

Real child processes (small Python programs), no broker: fast, and no timing luck: every wait ends on an
event (a line in the log, the child's exit), and a child that ignores SIGTERM is killed whatever the speed.
"""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import pytest

from synthwatch.settings import Settings
from synthwatch.stack.process import StackProcess, StackProcessError
from tests.conftest import wait_until


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_ready_when_the_child_writes_its_own_stack_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    child = _python(
        f"""
        import os, time
        from synthwatch.settings import Settings
        from synthwatch.stackfile import StackInfo, write_stack
        write_stack(Settings(data_dir={str(settings.data_dir)!r}), StackInfo(
            pid=os.getpid(), bootstrap_servers="127.0.0.1:1", web_url="http://127.0.0.1:2",
            clickhouse_url="chdb://x", started_at="now", ready_seconds=0.5))
        time.sleep(120)
        """
    )
    with StackProcess(child, tmp_path / "child.log", settings=settings, what="the child") as stack:
        info = stack.wait_ready(timeout=60)
        assert info.pid == stack.pid and info.ready_seconds == 0.5
        process = stack.process
    assert process.returncode == -signal.SIGTERM  # stopped on leaving the block, gracefully


def test_a_child_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = StackProcess(
        _python("print('cannot open the engine', flush=True); raise SystemExit(3)"),
        log,
        settings=Settings(data_dir=tmp_path),
        what="`synthwatch up`",
    )
    with child, pytest.raises(StackProcessError) as raised:
        child.wait_ready(timeout=60)
    message = str(raised.value)
    assert message.startswith(f"`synthwatch up` exited with code 3 (log: {log}):\n")
    assert "cannot open the engine" in message


def test_not_ready_in_time_names_the_log_only_when_asked_for_no_tail(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = StackProcess(
        _python("import time; print('still starting', flush=True); time.sleep(120)"),
        log,
        settings=Settings(data_dir=tmp_path),
        what="worker",
        tail=0,
    )
    with child:
        wait_until(lambda: "still starting" in log.read_text(), 60, "the child's first line")
        with pytest.raises(StackProcessError) as raised:
            child.wait_ready(timeout=0.2)
    assert str(raised.value) == f"worker was not ready after 0 s (log: {log})"


def test_a_child_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = StackProcess(
        _python(
            """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print('ignoring SIGTERM', flush=True)
            time.sleep(120)
            """
        ),
        log,
        stop_timeout=0.5,
    ).start()
    wait_until(lambda: "ignoring SIGTERM" in log.read_text(), 60, "the child to ignore SIGTERM")
    assert child.stop() == -signal.SIGKILL


def test_without_settings_there_is_no_stack_file_to_wait_for(tmp_path: Path) -> None:
    child = StackProcess(_python("import time; time.sleep(120)"), tmp_path / "child.log")
    with child, pytest.raises(StackProcessError, match="no settings given"):
        child.wait_ready(timeout=1)
