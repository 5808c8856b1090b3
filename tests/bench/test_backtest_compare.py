"""``synthwatch bench backtest --python OTHER``: the versions alternate, and the ratios point the right way."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from synthwatch.bench import throughput


def test_checkouts_alternate_and_ratios_are_to_this_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each round runs every file by each interpreter, the order reversed every other round (so neither version
    always runs first, after the other has warmed the disk cache); medians and ratios are to the first (this)."""
    calls: list[tuple[str, str]] = []
    seconds = {"this": (2.0, 4.0), "other": (4.0, 6.0)}  # (wall, CPU) of each version, whatever the file

    def fake(path: Path, output: Path, python: str = "this") -> tuple[float, float]:
        calls.append((path.name, python))
        return seconds[python]

    monkeypatch.setattr(throughput, "_command_seconds", fake)
    out = io.StringIO()
    files = [("one line", tmp_path / "one", 1), ("year", tmp_path / "year", 100_000)]
    rates = throughput._compare_checkouts(Console(file=out, width=250), files, ["this", "other"], 3, tmp_path)

    assert calls == [
        ("one", "this"), ("one", "other"), ("year", "this"), ("year", "other"),
        ("one", "other"), ("one", "this"), ("year", "other"), ("year", "this"),
        ("one", "this"), ("one", "other"), ("year", "this"), ("year", "other"),
    ]  # fmt: skip
    assert rates == {"one line": 0.5, "year": 50_000.0}
    row = next(line for line in out.getvalue().splitlines() if "year" in line and "other" in line)
    assert "6.00 / 6.00 / 6.00" in row and "1.50" in row and "0.50" in row  # CPU 1.5x this one's, half the rate
    assert "4.00 / 4.00 / 4.00" in row  # each round's wall time too: the spread a median hides


def test_each_command_runs_outside_any_checkout(tmp_path: Path) -> None:
    """``python -m`` puts the working directory first on the import path: run from this checkout, another
    checkout's interpreter imported this one's ``synthwatch/`` with its own other packages (mixed code). The
    command runs in its input's folder; a stand-in interpreter records where it ran."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\npwd > "$7"\n')  # -m synthwatch.cli.main backtest --input IN --output OUT
    stand_in.chmod(0o755)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "stream.ndjson").write_text("{}\n")
    output = tmp_path / "out.ndjson"

    throughput._command_seconds(inputs / "stream.ndjson", output, python=str(stand_in))

    assert Path(output.read_text().strip()).resolve() == inputs.resolve()


def test_the_benchmark_files_are_dated_after_their_last_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command takes a file's modification time as its receipt: the simulated year of 2026, written now, lost its
    last weeks to the future-time rule (8,331 lines refused on 2026-12-07), so the command detected less than the
    in-process loop, and less each day earlier it ran."""
    import json
    from datetime import UTC, datetime

    dated: dict[str, tuple[datetime, datetime]] = {}

    def occurred(line: str) -> datetime | None:
        try:
            at = datetime.fromisoformat(json.loads(line)["occurred_at"])
        except (ValueError, KeyError, TypeError):
            return None  # the simulator's malformed lines
        return at if at.tzinfo is not None else None

    def files_only(console: Console, files: list[tuple[str, Path, int]], *_: object) -> dict[str, float]:
        for name, path, _lines in files:
            last = max(at for line in path.read_text().splitlines() if (at := occurred(line)) is not None)
            dated[name] = (datetime.fromtimestamp(path.stat().st_mtime, UTC), last)
        return {}

    monkeypatch.setattr(throughput, "_compare_checkouts", files_only)
    throughput.bench_backtest(Console(file=io.StringIO()), days=365, seed=1, small_lines=30_000, others=["x"], rounds=1)

    assert len(dated) == 3
    assert all(received > last for received, last in dated.values()), dated
