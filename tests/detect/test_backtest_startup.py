"""The backtest's start and end: work before the first block reaches the detector, or after the files are written, is
on every run's critical path."""

from __future__ import annotations

import gc
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from synthwatch.catalogue import shipped_catalogue
from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.stream_apps.detect import backtest, identity

_WITH_EXIT_MARK = """
import atexit, sys
from pathlib import Path
from typing import Any

import pytest
atexit.register(Path(sys.argv[1]).write_text, "torn down")
sys.argv = ["synthwatch", *sys.argv[2:]]
from synthwatch.cli.main import main
main()
"""


def test_a_finished_backtest_ends_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """Tearing the interpreter down after the backtest (its heap, RDKit, numpy freed object by object) cost
    0.07-0.1 s of every run, for nothing: the files are written and closed, the helpers joined. The process now
    ends at once after a success (no exit handler runs), with everything written and printed; a failure exits
    as before."""
    lines = simulate(SimulationConfig(days=3, seed=2, start=date(2026, 1, 1))).lines
    events, out, mark = tmp_path / "in.ndjson", tmp_path / "alerts.ndjson", tmp_path / "mark"
    events.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    command = [sys.executable, "-c", _WITH_EXIT_MARK, str(mark), "backtest", "--input", str(events), "--output"]

    done = subprocess.run([*command, str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert not mark.exists()  # no teardown: the exit handlers did not run
    assert f"backtest of {events.name}" in done.stdout and done.stdout.endswith(".rejects.ndjson\n")  # all printed
    expected = backtest.run_lines((f"{events.name}:{n}", line) for n, line in enumerate(lines, start=1))
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(expected.alerts) > 0

    failed = subprocess.run([*command[:-3], "--input", str(tmp_path / "absent"), "--output", str(out)], timeout=120)
    assert failed.returncode == 1 and mark.read_text() == "torn down"  # a failure exits the usual way


def test_the_backtest_command_builds_its_start_without_the_collector_and_turns_it_back_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector's passes over the start-up's objects (RDKit, the detector's modules, the catalogue) cost ~25 ms
    of CPU before the first line; the reader's loop ran without it already. Off from the command's start, back on
    when it returns."""
    from typer.testing import CliRunner

    from synthwatch.cli.main import app

    seen: list[bool] = []
    run_file = backtest.run_file

    def recording(*args: Any, **kwargs: Any) -> backtest.BacktestRun:
        seen.append(gc.isenabled())
        return run_file(*args, **kwargs)

    monkeypatch.setattr(backtest, "run_file", recording)
    events = tmp_path / "in.ndjson"
    events.write_text(simulate(SimulationConfig(days=1, seed=2, start=date(2026, 1, 1))).lines[0] + "\n")
    assert gc.isenabled()

    result = CliRunner().invoke(app, ["backtest", "--input", str(events), "--output", str(tmp_path / "a.ndjson")])

    assert result.exit_code == 0, result.output
    assert seen == [False]  # the catalogue and the detector built without it
    assert gc.isenabled()


def test_the_first_block_goes_to_the_detector_before_the_helpers_second_part_is_awaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blocks are cut by lines read, as the helper's are: the first block (the helper's first part, 1,024 lines)
    is sent once its lines are read. Cut at 1,024 observations, a malformed line among them made it wait for the
    helper's answers for the next 3,072 lines first, and the detector waited with it."""
    first = backtest._first_block_lines()
    lines = simulate(SimulationConfig(days=30, seed=2, start=date(2026, 1, 1))).lines
    lines.insert(10, "{not json")  # a malformed line in the first block
    assert len(lines) > 2 * backtest._BLOCK_LINES
    numbered = [(f"sim:{n}", line) for n, line in enumerate(lines)]
    head = set(backtest._spellings(numbered[:first], set()))
    catalogue = {entry.smiles for entry in shipped_catalogue()}  # standardised by the intake, in this process
    second = set(backtest._spellings(numbered[first : backtest._BLOCK_LINES], set())) - head - catalogue
    assert second  # only the second part's

    def sending(sink: type[Any]) -> Any:
        send = sink.send

        def recorded(self: Any, block: list[Any], lines: int = 0) -> None:
            known = second & identity._BY_SPELLING.keys()  # the second part's structures this process has
            sent.append((len(known), len(block), lines))
            send(self, block, lines)

        return recorded

    sent: list[tuple[int, int, int]] = []
    monkeypatch.setattr(identity, "_BY_SPELLING", {})  # none known before (the catalogue's come in with the intake)
    # either sink: a test process holding the embedded engine detects in-process (no fork), with the same blocks
    for sink in (backtest._DetectionProcess, backtest._InProcess):
        monkeypatch.setattr(sink, "send", sending(sink))

    run = backtest.run_lines(iter(numbered))

    assert sent[0][0] == 0  # none of the second part's structures awaited when the first block left
    assert sent[1][0] == len(second)  # (they are by the second)
    assert sent[0][2] == first and sent[0][1] < first  # its lines, one of them malformed
    assert sum(count for _known, _block, count in sent) == len(lines) == run.summary.lines
