"""``synthwatch up`` stops only once what its broker accepted is stored: the embedded broker keeps
records in memory, so whatever the worker has not stored when the broker stops is gone.

The first Ctrl-C (SIGINT), SIGTERM or SIGHUP starts a drain: the worker keeps running until its group
has committed every record of the topics it consumes (the input topics, then sightings, alerts and
rejects): an offset is committed only after its checkpoint (rows in ClickHouse, detector state
written), so committed = end means stored. The drain prints its progress and what a second Ctrl-C
would lose; it gives up after ``drain_timeout_seconds``. A second signal stops at once. Either way,
once the worker is down and before the broker stops, ``up`` counts the records still not committed
less those the worker stored but could not commit (:func:`final_count`): that count, not an estimate
made while the worker still ran, is what it reports as not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import faust

from synthwatch.settings import Settings
from synthwatch.stack.broker import lag_by_topic
from synthwatch.stack.service_worker import ServiceWorker

log = logging.getLogger("synthwatch.stack.drain")

#: Seconds between two progress lines while draining.
PROGRESS_SECONDS = 2.0


@dataclass
class DrainOutcome:
    """How the stop went: ``not_stored`` records per topic once the worker was down (None: unknown).

    ``stored_uncommitted``: per (topic, partition), the offsets the worker stored (acknowledged after
    their checkpoint) that no commit covered when it stopped (:func:`.transport.stored_uncommitted`).
    """

    reason: str = "drained"
    not_stored: dict[str, int] | None = field(default_factory=dict)
    stored_uncommitted: Mapping[tuple[str, int], Collection[int]] = field(default_factory=dict)

    @property
    def lost(self) -> int | None:
        return None if self.not_stored is None else sum(self.not_stored.values())

    @property
    def drained(self) -> bool:
        return self.lost == 0


def drained_topics(settings: Settings) -> tuple[str, ...]:
    """The topics the worker consumes: a record in one of them not committed yet is not stored yet."""
    return (*settings.input_topics, settings.topic_sightings, settings.topic_alerts, settings.topic_rejects)


def final_count(settings: Settings, bootstrap_servers: str, outcome: DrainOutcome) -> DrainOutcome:
    """``outcome`` with what is really not stored: per partition, the records between the group's committed
    offset and the end that the worker did not store (``outcome.stored_uncommitted``), once it has stopped.

    Why not the lag alone: a worker stopped while its broker is unwell stores what it had fetched but cannot
    commit it (a fetch answered just before the broker froze, read after; its checkpoint finished while the
    worker stopped); the lag counted those stored records as lost. The broker must still run: it is the
    only place that knows the committed offsets and the ends.
    """
    try:
        lag = lag_by_topic(
            bootstrap_servers, settings.app_id, drained_topics(settings), 10.0, outcome.stored_uncommitted
        )
    except Exception as error:  # the broker is unwell: say so rather than guess
        return DrainOutcome(f"{outcome.reason}; could not count what is left: {error!r}", None)
    return DrainOutcome(outcome.reason, lag)  # None: a partition's end is unknown, so is what is left


def describe_lag(settings: Settings, lag: dict[str, int]) -> str:
    """'1,234 reports (lab detections 800, border seizures 434); in flight: 3 sightings, 1 alert, 0 rejects'."""
    reports = sum(lag.get(t, 0) for t in settings.input_topics)
    inside = (
        f"lab detections {lag.get(settings.topic_lab_detections, 0):,}, "
        f"border seizures {lag.get(settings.topic_border_seizures, 0):,}"
    )
    flight = ", ".join(
        f"{lag.get(topic, 0):,} {name}"
        for topic, name in (
            (settings.topic_sightings, "sightings"),
            (settings.topic_alerts, "alerts"),
            (settings.topic_rejects, "rejects"),
        )
    )
    return f"{reports:,} reports ({inside}); in flight: {flight}"


class DrainingWorker(ServiceWorker):
    """Faust's worker whose first stop signal drains (see the module docstring) and second stops now."""

    def __init__(
        self,
        app: faust.App,
        *args: Any,
        settings: Settings,
        bootstrap_servers: str,
        announce: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, *args, **kwargs)
        self.drain_settings = settings
        self.drain_servers = bootstrap_servers
        self.announce = announce
        self.outcome = DrainOutcome("stopped before the drain began")
        self._drain: asyncio.Future[None] | None = None
        self._last_lag: dict[str, int] | None = None

    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        self.loop.add_signal_handler(signal.SIGHUP, self._on_sigterm)  # the terminal closed

    def _on_sigint(self) -> None:
        self._drain_or_stop(signal.SIGINT)

    def _on_sigterm(self) -> None:
        self._drain_or_stop(signal.SIGTERM)

    def _tell(self, message: str) -> None:
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) must not stop the drain
            self.announce(message)

    def _drain_or_stop(self, sig: signal.Signals) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_stop(sig), loop=self.loop)
            return
        if self._drain.done():
            return  # already stopping
        self._drain.cancel()
        self.outcome = DrainOutcome("stopped by a second signal")
        log.warning("stop signal %s while draining: stopping without storing what the broker holds", sig.name)
        said = f" ({describe_lag(self.drain_settings, self._last_lag)} at the last count)" if self._last_lag else ""
        self._tell(f"Stopping now; what the broker still holds is lost{said}. Counting it ...")
        self._schedule_shutdown(sig)

    async def _drain_then_stop(self, sig: signal.Signals) -> None:
        settings = self.drain_settings
        timeout = settings.drain_timeout_seconds
        started = self.loop.time()
        said = started - PROGRESS_SECONDS
        self._tell(
            f"Stopping: storing what the broker holds first (at most {timeout:.0f} s, "
            "SYNTHWATCH_DRAIN_TIMEOUT_SECONDS). Ctrl-C again stops at once and loses it."
        )
        try:
            while True:
                try:
                    lag = await self.loop.run_in_executor(
                        None, lag_by_topic, self.drain_servers, settings.app_id, drained_topics(settings), 5.0
                    )
                except Exception as error:  # the broker did not answer this time: unknown, not zero
                    log.warning("counting what is left to store failed: %r", error)
                    lag = None
                now = self.loop.time()
                if lag is not None:
                    self._last_lag = lag
                    if sum(lag.values()) == 0:
                        self.outcome = DrainOutcome("drained")
                        self._tell(f"Drained in {now - started:.1f} s: every accepted event is stored.")
                        break
                if now - started >= timeout:
                    self.outcome = DrainOutcome(f"gave up draining after {timeout:.0f} s")
                    log.warning("gave up draining after %.0f s; not stored at the last count: %s", timeout, lag)
                    self._tell(f"Gave up draining after {timeout:.0f} s; is the worker stuck? See its log above.")
                    break
                if now - said >= PROGRESS_SECONDS:
                    said = now
                    pending = describe_lag(settings, lag) if lag is not None else "unknown (the broker did not answer)"
                    # Uncommitted, not unstored: a checkpoint stores first and commits after, so right after a
                    # checkpoint every report of it is counted here though stored (the demo said "not stored yet:
                    # 6,134 reports" with all 6,134 in ClickHouse). Those are not lost on a second Ctrl-C.
                    self._tell(
                        f"Draining ({now - started:.0f} s): not committed yet: {pending}. "
                        "Ctrl-C again loses those not stored yet."
                    )
                await asyncio.sleep(0.25)
        except Exception as error:  # the stop must happen whatever went wrong while counting
            self.outcome = DrainOutcome(f"drain failed: {error!r}")
            log.exception("the drain failed; stopping")
            self._tell(f"Could not drain ({error!r}); stopping.")
        self._schedule_shutdown(sig)
