"""An exception out of an agent stops the worker at once (exit status 1); the agent is never restarted in place.

Why: Faust's default supervisor (``OneForOneSupervisor``) restarts a dead agent on the stream it had. For the
worker's agents that restart was a silent stall, and could not be made safe:

- the batching (:func:`.batches.channel_batches`) stops the agent's stream when the dead agent's batches are
  closed, so the restarted agent found its stream stopped, returned at once and took nothing more: its
  topic's records stayed unprocessed while ``/ready`` said ready, until the watchdog's ``stall_seconds``;
- made restartable (as Faust's own stream iteration resets its stream), it was worse: the events the dead
  agent held (tracked, never acknowledged: its batch and everything since its last checkpoint) kept the
  committed offset below them (:meth:`.transport.Consumer._filter_committable_offsets`) while the new agent
  processed later records; what the dead one held in memory (rows to store, sends) was gone; and once the
  watchdog sought back, the records it held came again to detector state that had moved past them (the
  new agent's records set its replay marks, :mod:`..detect.replay`), which skipped them as replayed. Measured
  (intake, one partition, a defect injected on the 8th of 15 events): 7 events committed and never stored,
  ``/ready`` ready all along.

The only state known to match what is durable is the one a new process recovers: the changelogs and the
committed offsets. So the failing agent's exception is logged (redacted, like every log record), counted
in ``synthwatch_agent_failures_total{agent}``, ``/ready`` answers 503 naming it, and the worker stops with
exit status 1 for its orchestrator to restart it; the new process processes again every record after the
committed offsets: nothing is lost, nothing is stored twice. Records an agent is expected to meet are
refused with a reason instead (the intake's validation, the storing agents' parsers, the novelty agent's
:func:`.agents.novelty.parse_sightings`): an exception out of an agent is a defect or a failure of the
process, which a restart retries, never a record the pipeline skips.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mode import ServiceT, SupervisorStrategyT
from mode.supervisors import CrashingSupervisor

from synthwatch.redaction import redact
from synthwatch.schemas.text import visible
from synthwatch.stream_apps.runtime.metrics import WorkerMetrics

log = logging.getLogger("synthwatch.stack.worker")


def stopping_supervisor(on_failure: Callable[[str, BaseException], None]) -> type[SupervisorStrategyT]:
    """Faust's ``agent_supervisor``: mode's ``CrashingSupervisor`` (an actor that raises crashes the worker,
    whose process exits 1 with the exception) that first tells ``on_failure`` which agent raised what."""

    class StopWorker(CrashingSupervisor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.told: set[int] = set()  # the actors whose failure was told (by id: Faust keeps them alive)

        def wakeup(self) -> None:
            # Called by Faust's _execute_actor right after the actor crashed (it has no supervisor of its
            # own here, so its crash has marked the worker crashed too: the worker is stopping).
            for service in self._services:
                if service.crashed and service.crash_reason is not None and id(service) not in self.told:
                    self.told.add(id(service))
                    on_failure(_agent_name(service), service.crash_reason)
            super().wakeup()

    return StopWorker


def _agent_name(actor: ServiceT) -> str:
    agent: Any = getattr(actor, "agent", None)
    name = getattr(agent, "name", None)
    return str(name).rsplit(".", 1)[-1] if name else type(actor).__name__


#: Longest exception message kept in ``/ready``'s ``failed`` (it may quote a record).
MAX_MESSAGE_CHARS = 500


def agent_failed(metrics: WorkerMetrics) -> Callable[[str, BaseException], None]:
    """What the worker does when an agent raised: log, count, not ready (the worker is already stopping).

    The reason (also in ``/ready``) has the exception's message redacted and on one line: it may quote a
    record's field or a URL with its password."""

    def on_failure(agent: str, error: BaseException) -> None:
        message = visible(redact(str(error)))
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "... [cut]"
        reason = f"agent {agent} failed: {type(error).__name__}: {message}"
        metrics.agent_failed(agent, reason)
        log.critical(
            "%s; stopping the worker (exit status 1) so that it restarts from its committed offsets and "
            "stored state: the records in flight are processed again, none is lost",
            reason,  # Faust has logged the traceback ("Crashed reason=...")
        )

    return on_failure
