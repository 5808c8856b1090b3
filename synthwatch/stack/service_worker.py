"""Faust's worker for a service, without the second every stop waited out before the process could exit."""

from __future__ import annotations

import asyncio

import faust

#: The most the loop's close waits for tasks still running (mode's fixed sleep before it closes the loop).
CLOSE_WAIT_SECONDS = 1.0


class ServiceWorker(faust.Worker):
    """``faust.Worker`` whose event loop closes as soon as what the stop left running has ended.

    Why: mode's worker runs a sentinel task that sleeps 1 s before it closes the loop, so that callbacks and
    tasks the stop left behind get to run. The tasks are already cancelled and gone by then almost always, so
    every stop of a worker (a user's Ctrl-C, a restart, each test) waited a whole second for nothing. This
    one waits for those tasks and any they start meanwhile (never longer than mode did), then lets the
    callbacks they scheduled run.
    """

    async def _sentinel_task(self) -> None:
        current = asyncio.current_task()
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_SECONDS
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            # again after each wait: a task that ends may start another (a cleanup's own cleanup)
            running = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
            if not running:
                break
            await asyncio.wait(running, timeout=remaining)
        for _ in range(3):  # a closed transport's connection_lost, then what that schedules, then its sockets
            await asyncio.sleep(0)
