"""The backtest's speed-ups change nothing: the helper process filling the structure cache ahead of the
reader gives the same alerts, rejects and counts as resolving every structure inline."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.stream_apps.detect import backtest, identity
from synthwatch.stream_apps.detect.backtest import BacktestRun, run_lines


def _comparable(run: BacktestRun) -> tuple[Any, ...]:
    """Everything a run produced except wall-clock stamps and its duration."""
    alerts = [a.model_dump(mode="json", exclude={"detected_at"}) for a in run.alerts]
    rejects = [r.model_dump(mode="json", exclude={"rejected_at"}) for r in run.rejects]
    counts = {**vars(run.summary), "seconds": None}
    return alerts, rejects, counts


def test_structures_computed_ahead_in_a_helper_process_give_the_same_run(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = simulate(SimulationConfig(days=45, seed=3, start=date(2026, 1, 1)))
    lines = [(f"sim:{i}", line) for i, line in enumerate(sim.lines)]
    assert sum('"smiles"' in line for _, line in lines) > 1000

    monkeypatch.setattr(backtest, "_BLOCK_LINES", len(lines) + 1)  # one block: no helper process
    monkeypatch.setattr(identity, "_BY_SPELLING", {})
    inline = run_lines(lines)

    monkeypatch.setattr(backtest, "_BLOCK_LINES", 500)  # many blocks: the helper runs a block ahead
    monkeypatch.setattr(identity, "_BY_SPELLING", {})
    helped = run_lines(iter(lines))
    assert len(identity._BY_SPELLING) > 100  # the cache was filled, by the helper's answers among others

    assert _comparable(helped) == _comparable(inline)
    assert helped.summary.lines == len(lines) and helped.alerts
