"""The worker's event loop closes once what its stop left running has ended, not after a fixed second."""

from __future__ import annotations

import asyncio

import faust
import pytest

from synthwatch.stack.drain import DrainingWorker
from synthwatch.stack.service_worker import ServiceWorker
from synthwatch.stack.worker import faust_worker


def test_both_workers_of_the_cli_are_service_workers() -> None:
    assert issubclass(DrainingWorker, ServiceWorker)
    app = faust.App("service-worker-test", broker="kafka://127.0.0.1:1", web_enabled=False)
    assert isinstance(faust_worker(app, "warning"), ServiceWorker)


def test_the_close_waits_for_a_task_still_ending_and_never_sleeps_a_fixed_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mode's sentinel slept 1 s before every close of the loop: each stop of a worker waited it out."""
    sleep, delays = asyncio.sleep, []

    async def recorded(delay: float, *args: object) -> object:
        delays.append(delay)
        return await sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    worker = ServiceWorker.__new__(ServiceWorker)  # the sentinel uses nothing of the instance
    ended: list[str] = []
    started: list[asyncio.Future[None]] = []

    async def then() -> None:  # a task the cleanup starts: waited for too
        for _ in range(20):
            await sleep(0)
        ended.append("its own cleanup")

    async def ending() -> None:  # a task the stop cancelled, still running its cleanup
        for _ in range(20):
            await sleep(0)
        ended.append("cleanup")
        started.append(asyncio.ensure_future(then()))

    async def close() -> None:
        cleanup = asyncio.ensure_future(ending())
        await worker._sentinel_task()
        assert cleanup.done() and ended == ["cleanup", "its own cleanup"]

    asyncio.run(close())
    assert delays and all(delay == 0 for delay in delays), delays
