"""bench.memory --snapshot: a tracemalloc snapshot's allocations by the project's code that asked for them."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from rich.console import Console

from synthwatch.bench.memory import snapshot_report
from synthwatch.bench.workload import simulated_lines


def test_allocations_are_put_to_the_project_line_that_made_them(tmp_path: Path) -> None:
    simulated_lines(100)  # its imports first: they are not what is measured
    tracemalloc.start(5)
    try:
        lines = simulated_lines(2_000)  # the lines are built in producers/simulate/assemble.py
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    dump = tmp_path / "snap.dump"
    snapshot.dump(str(dump))
    held = sum(len(line) for line in lines)
    report = snapshot_report(dump, Console(width=200, file=(tmp_path / "out.txt").open("w")), top=5)
    top = report["owners"][0]
    assert top["where"].startswith("simulate/assemble.py:"), report["owners"]
    assert top["bytes"] >= held  # every line's text, at least
    assert report["traced_bytes"] >= top["bytes"] and report["blocks"] >= len(lines)
