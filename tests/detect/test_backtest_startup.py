"""The backtest's start and end: work before the first block reaches the detector, or after the files are written, is
on every run's critical path."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from synthwatch.catalogue import shipped_catalogue
from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.stream_apps.detect import backtest, identity

_WITH_EXIT_WORK = """
import atexit, sys, tempfile, threading
from pathlib import Path

marks = Path(sys.argv[1])
atexit.register((marks / "exit handler").write_text, "ran")  # as coverage, a logging handler or the engine do
kept = tempfile.TemporaryDirectory(dir=marks)  # removed at exit by its weakref.finalize


class Freed:  # freed only by the interpreter's teardown
    def __del__(self, write=(marks / "torn down").write_text) -> None:
        write("freed")


held = Freed()
if sys.argv[2] == "thread":  # a thread the usual exit waits for: it ends once the main thread has
    threading.Thread(target=lambda: (threading.main_thread().join(), (marks / "thread").write_text("ended"))).start()
sys.argv = ["synthwatch", *sys.argv[3:]]
from synthwatch.cli.main import main
main()
"""


def _backtest_with_exit_work(marks: Path, *arguments: str, thread: bool = False, shell: str = "") -> Any:
    marks.mkdir()
    script = [sys.executable, "-c", _WITH_EXIT_WORK, str(marks), "thread" if thread else "-", "backtest", *arguments]
    command = ["sh", "-c", f'exec "$@" {shell}', "sh", *script] if shell else script
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=marks)


def test_a_finished_backtest_ends_without_the_interpreters_teardown(tmp_path: Path) -> None:
    """Tearing the interpreter down after the backtest (its heap, RDKit, numpy freed object by object) cost
    0.07-0.1 s of every run, for nothing: the files are written and closed, the helpers joined. The process now
    ends at once after a success, with everything written and printed and the exit work anything registered
    done (exit handlers, temporary directories' cleanup); a failure exits as before."""
    lines = simulate(SimulationConfig(days=3, seed=2, start=date(2026, 1, 1))).lines
    events, out = tmp_path / "in.ndjson", tmp_path / "alerts.ndjson"
    events.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    done = _backtest_with_exit_work(tmp_path / "ok", "--input", str(events), "--output", str(out))

    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "ok" / "torn down").exists()  # no teardown
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["exit handler"]  # ran; the temporary dir gone
    assert f"backtest of {events.name}" in done.stdout and done.stdout.endswith(".rejects.ndjson\n")  # all printed
    expected = backtest.run_lines((f"{events.name}:{n}", line) for n, line in enumerate(lines, start=1))
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(expected.alerts) > 0

    failed = _backtest_with_exit_work(tmp_path / "failed", "--input", str(tmp_path / "absent"), "--output", str(out))
    assert failed.returncode == 1 and (tmp_path / "failed" / "torn down").read_text() == "freed"  # the usual exit


def test_a_finished_backtest_with_standard_output_closed_succeeds(tmp_path: Path) -> None:
    """Run with standard output closed (``>&-``; Python's ``sys.stdout`` is then None, and Rich prints to
    nowhere), a finished backtest flushed ``None`` and failed (exit 1, a traceback) after writing its alerts."""
    events, out = tmp_path / "in.ndjson", tmp_path / "alerts.ndjson"
    events.write_text(simulate(SimulationConfig(days=1, seed=2, start=date(2026, 1, 1))).lines[0] + "\n")

    done = _backtest_with_exit_work(tmp_path / "marks", "--input", str(events), "--output", str(out), shell=">&-")

    assert (done.returncode, done.stderr) == (0, "")
    assert out.exists() and not (tmp_path / "marks" / "torn down").exists()


def test_a_finished_backtest_waits_for_a_running_thread_as_the_usual_exit_does(tmp_path: Path) -> None:
    """A thread still running at the end (not a daemon) is waited for by the usual exit, then the exit handlers
    run (how a process pool's thread joins its processes): the process is not ended under it."""
    events, out = tmp_path / "in.ndjson", tmp_path / "alerts.ndjson"
    events.write_text(simulate(SimulationConfig(days=1, seed=2, start=date(2026, 1, 1))).lines[0] + "\n")

    done = _backtest_with_exit_work(tmp_path / "marks", "--input", str(events), "--output", str(out), thread=True)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "marks" / "thread").read_text() == "ended"
    assert (tmp_path / "marks" / "exit handler").read_text() == "ran"


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


def test_every_block_goes_to_the_detector_before_the_helpers_next_answers_are_awaited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blocks end where the helper's do (1,024, 4,096, 8,192, ... lines): each is sent before the reader asks for the
    next line, which waits for the helper's answers for its next block. Cut at 4,096 lines after the first, every
    block ended 1,024 lines into the helper's next one: at each helper boundary the detector waited for the helper's
    answers with 3,072 lines read and not sent (at the start, where the helper is behind, 0.3 s of the year)."""
    lines = simulate(SimulationConfig(days=50, seed=2, start=date(2026, 1, 1))).lines
    size = backtest._BLOCK_LINES
    assert len(lines) > 3 * size
    numbered = [(f"sim:{n}", line) for n, line in enumerate(lines)]
    ends: list[int] = []  # the lines read when each block was sent
    asked: list[tuple[int, int]] = []  # (lines sent so far, helper blocks awaited so far) at each helper await

    def sending(sink: type[Any]) -> Any:
        send = sink.send

        def recorded(self: Any, block: list[Any], lines: int = 0) -> None:
            ends.append((ends[-1] if ends else 0) + lines)
            send(self, block, lines)

        return recorded

    remember = backtest.remember_structures

    def awaited(found: Any) -> None:
        asked.append((ends[-1] if ends else 0, len(asked)))
        remember(found)

    for sink in (backtest._DetectionProcess, backtest._InProcess):
        monkeypatch.setattr(sink, "send", sending(sink))
    monkeypatch.setattr(backtest, "remember_structures", awaited)

    run = backtest.run_lines(iter(numbered))

    first = backtest._first_block_lines()
    assert ends[:4] == [first, size, 2 * size, 3 * size]
    # the helper's answers for lines (k-1)*4,096.. k*4,096 (its k+1-th answer, after the first block's two parts)
    # are awaited only once every line before them is sent
    assert [sent for sent, _k in asked[:5]] == [0, first, size, 2 * size, 3 * size]
    assert ends[-1] == len(lines) == run.summary.lines


_DETECTION_THREADS = """
import os, sys
from synthwatch.stream_apps.detect.backtest import _DetectionProcess


def threads() -> tuple[str | None, bool, int]:
    # The detection process has built its similarity index (so imported numpy) before it runs any block.
    return os.environ.get("OPENBLAS_NUM_THREADS"), "numpy" in sys.modules, len(os.listdir("/proc/self/task"))


if len(sys.argv) > 1:
    os.environ["OPENBLAS_NUM_THREADS"] = sys.argv[1]
sink = _DetectionProcess(None)
try:
    print(*sink.pool.submit(threads).result(timeout=60))
finally:
    sink.close()
print("numpy" in sys.modules, os.environ.get("OPENBLAS_NUM_THREADS"))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_the_detection_process_starts_no_blas_threads(tmp_path: Path) -> None:
    """The detection process imports numpy with the similarity index (RDKit's fingerprint generator imports it) and
    runs no BLAS routine, but OpenBLAS started a thread per core that spun ~50 ms at the import: CPU taken from the
    structure helper while the reader waited for its first answers. One BLAS thread there (none started), set in that
    process only: the command's own process keeps its environment, and a value the user set is kept."""

    def run(*setting: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", _DETECTION_THREADS, *setting],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert run() == ["1", "True", "1", "False", "None"]  # the pool's worker alone; the reader's process unchanged
    assert run("2")[:2] == ["2", "True"]  # the user's setting is the user's


def test_the_structure_helper_is_nicer_than_the_reader_and_the_detector() -> None:
    """On 2 cores three busy processes shared them fairly, and the detection process (order-bound, the larger half)
    lost a third of its core while the helper had work; the helper now runs behind them, on what they leave idle
    (the reader's core while the reader waits for its answers). Its answers are unchanged (the pinned digests)."""
    lines = [(f"l:{i}", "{}") for i in range(backtest._BLOCK_LINES + 1)]  # two blocks: the helper starts
    ahead, helped = backtest._with_structures_ahead(lines)
    try:
        assert helped
        pool = ahead.gi_frame.f_locals["pool"]  # type: ignore[attr-defined]  # the generator holds the pool
        assert pool.submit(os.nice, 0).result(timeout=60) == min(19, os.nice(0) + 10)
    finally:
        ahead.close()


def test_a_refused_niceness_leaves_the_helper_working(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a policy refuses setpriority (seccomp, a sandbox: EPERM), the helper stays at the reader's niceness and
    answers as before. Raised in the pool's initializer, the refusal broke the pool (BrokenProcessPool at the first
    answer awaited) and failed every backtest of more than one block over a scheduling preference."""

    def refused(increment: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refused)
    backtest._behind_the_others()  # raised before
    if not backtest._fork_is_safe():
        return  # a forkserver helper does not inherit the patch: the call above is the check
    # the helper is forked: it inherits the patched module, and its initializer's refusal broke the pool before
    lines = [(f"l:{i}", "{}") for i in range(backtest._BLOCK_LINES + 1)]  # two blocks: the helper starts
    ahead, helped = backtest._with_structures_ahead(lines)
    try:
        assert helped
        assert list(ahead) == lines  # every answer awaited, so the helper ran
    finally:
        ahead.close()
