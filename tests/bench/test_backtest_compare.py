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
