"""The back-off loop around a blocking ClickHouse call: retry until it works, never drop what it carries.

Why here, in the storage layer: the worker's agents (:mod:`synthwatch.stream_apps.runtime`) and the
deliveries store (the delivery service's ``_store``) both wait for ClickHouse this way; one loop keeps
their delays and log lines the same. While a caller waits here it takes no new events, so Faust's
stream buffer fills and fetching pauses: the consumer waits for ClickHouse instead of losing data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: First wait after a failure, in seconds; doubled after each further failure up to :data:`LONGEST_DELAY`.
FIRST_DELAY = 0.2
LONGEST_DELAY = 30.0


async def retry_until_done(
    what: str,
    call: Callable[[], T],
    *,
    log: logging.Logger,
    give_up: Callable[[int], bool] = lambda attempt: False,
    on_retry: Callable[[str], None] | None = None,
    on_success: Callable[[str], None] | None = None,
) -> T:
    """Run ``call`` in a thread (``asyncio.to_thread``: the default executor, context variables copied); on
    failure back off (0.2 s, doubling, at most 30 s) and retry.

    ``give_up(attempt)`` (attempts counted from 1) re-raises the failure instead, e.g. when the worker
    is stopping. ``on_retry(what)`` runs before each wait (counters), ``on_success(what)`` once it works.
    The warning names ``what`` on ``log`` (the caller's logger, so each caller's log lines stay its own).
    """
    delay = FIRST_DELAY
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await asyncio.to_thread(call)
        except Exception as error:
            if give_up(attempt):
                raise
            if on_retry is not None:
                on_retry(what)
            log.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LONGEST_DELAY)
        else:
            if on_success is not None:
                on_success(what)
            return result
