"""An agent that raises stops the worker: which agent and why is told once, counted, redacted, not ready."""

from __future__ import annotations

import asyncio
from typing import Any

from synthwatch.stream_apps.runtime.metrics import WorkerMetrics
from synthwatch.stream_apps.runtime.supervision import agent_failed, stopping_supervisor
from tests.runtime.test_metrics import value


class _Actor:
    """What the supervisor reads of a Faust actor: crashed or not, why, and its agent's name."""

    def __init__(self, name: str) -> None:
        self.agent = type("Agent", (), {"name": name})()
        self.crashed = False
        self.crash_reason: BaseException | None = None
        self.supervisor: Any = None


def test_an_agent_failure_is_counted_redacted_and_makes_the_worker_not_ready() -> None:
    metrics = WorkerMetrics()
    metrics.set_ready()
    error = RuntimeError("record at http://analyst:s3cret@ch.example/db\nFORGED log line token=abc")
    agent_failed(metrics)("intake", error)
    text = metrics.exposition()
    assert value(text, "synthwatch_agent_failures_total", agent="intake") == 1
    assert value(text, "synthwatch_worker_ready") == 0
    failed = metrics.stats.failed
    assert failed is not None and failed.startswith("agent intake failed: RuntimeError: record at")
    assert "s3cret" not in failed and "abc" not in failed and "\n" not in failed
    agent_failed(metrics)("novelty", ValueError("x" * 10_000))
    assert metrics.stats.failed == failed  # the first failure is the one /ready names
    assert value(metrics.exposition(), "synthwatch_agent_failures_total", agent="novelty") == 1


def test_the_supervisor_tells_each_crashed_actor_once_and_restarts_none() -> None:
    told: list[tuple[str, str]] = []

    async def run() -> Any:
        supervisor = stopping_supervisor(lambda agent, error: told.append((agent, str(error))))()
        intake, novelty = _Actor("intake"), _Actor("synthwatch.stream_apps.novelty")
        supervisor.add(intake, novelty)
        novelty.crashed, novelty.crash_reason = True, KeyError("occurred_at")
        supervisor.wakeup()  # what Faust's _execute_actor calls after the actor crashed
        supervisor.wakeup()
        return supervisor, novelty

    supervisor, novelty = asyncio.run(run())
    assert told == [("novelty", "'occurred_at'")]
    assert novelty.supervisor is None  # no supervisor of its own: its crash crashes the worker (mode's design)
    assert supervisor.should_stop  # and this supervisor restarts nothing
