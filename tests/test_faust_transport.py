"""The consumer's direct hand-over: a callback started by hand and finished as a task behaves as if awaited."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from synthwatch.stream_apps.runtime.transport import _finish


async def _steps(log: list[str], gate: asyncio.Future[str]) -> str:
    log.append("started")
    got = await gate  # suspends: the hand-over must finish it as a task
    log.append(f"got {got}")
    await asyncio.sleep(0)
    return f"done with {got}"


def _start(coro: Any) -> Any:
    """What Consumer.deliver does: one step by hand."""
    return coro.send(None)


def test_a_coroutine_started_by_hand_finishes_under_a_task_with_its_result() -> None:
    async def run() -> tuple[list[str], str]:
        log: list[str] = []
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        coro = _steps(log, gate)
        yielded = _start(coro)
        assert log == ["started"]
        task = asyncio.ensure_future(_finish(coro, yielded))
        await asyncio.sleep(0)
        gate.set_result("value")
        return log, await task

    log, result = asyncio.run(run())
    assert log == ["started", "got value"]
    assert result == "done with value"


def test_cancelling_the_task_cancels_the_coroutine_started_by_hand() -> None:
    async def run() -> list[str]:
        log: list[str] = []
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        coro = _steps(log, gate)
        task = asyncio.ensure_future(_finish(coro, _start(coro)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    assert asyncio.run(run()) == ["started"]


def test_an_exception_after_the_hand_over_reaches_the_awaiting_task() -> None:
    async def fails(gate: asyncio.Future[None]) -> None:
        await gate
        raise ValueError("queue closed")

    async def run() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        coro = fails(gate)
        task = asyncio.ensure_future(_finish(coro, _start(coro)))
        gate.set_result(None)
        with pytest.raises(ValueError, match="queue closed"):
            await task

    asyncio.run(run())
