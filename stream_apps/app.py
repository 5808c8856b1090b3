"""The Faust application: the worker's runtime parts (:mod:`synthwatch.stream_apps.runtime`) wired together.

Agents take batches straight from their channel (:mod:`.runtime.batches`), send what a batch produces
(alerts, sightings, rejects) at once, and store rows, write detector state and acknowledge offsets at
their checkpoints (:mod:`.runtime.checkpoints`), so a crash or a stop re-delivers rather than loses:

- ``intake`` on both input topics (:mod:`.runtime.agents.intake`): validate and enrich, the region
  stage (late reports, duplicates, spikes), rejects and sightings; spike alerts go out from the outbox
  in the state that decided them (:mod:`.runtime.outbox`) once that state is written.
- ``novelty`` on the sightings topic (:mod:`.runtime.agents.novelty`): new substances, first
  appearances in a region, spread.
- ``rejects`` and ``alerts`` store those topics in ClickHouse (:mod:`.runtime.agents.storing`); the
  ``delivery`` agent reads alerts too when officers subscribe (:mod:`.runtime.agents.delivery`).

Detector state lives in two changelog-backed Faust tables (:mod:`.runtime.state_tables`), recovered
or rebuilt from ClickHouse before the worker is ready (:mod:`.runtime.recovery`). A watchdog
(:mod:`.runtime.watchdog`) seeks stalled partitions back to their committed offsets and turns
``/ready`` to 503 if that does not help. An agent that raises stops the worker with exit status 1, to be
restarted from its committed offsets (:mod:`.runtime.supervision`). Web (worker HTTP port): ``/ready``, ``/sql`` and
``/deliveries/resend`` (:mod:`.runtime.web`), ``/metrics`` (:mod:`.runtime.metrics`).
"""

from __future__ import annotations

import faust

from synthwatch.schemas.topics import default_partition
from synthwatch.stream_apps.runtime.agents.delivery import add_delivery_agent
from synthwatch.stream_apps.runtime.agents.intake import add_intake_agent
from synthwatch.stream_apps.runtime.agents.novelty import add_novelty_agent
from synthwatch.stream_apps.runtime.agents.storing import add_storing_agents
from synthwatch.stream_apps.runtime.batches import agent_batches
from synthwatch.stream_apps.runtime.context import AgentContext, Topics, WorkerContext
from synthwatch.stream_apps.runtime.metrics import attach_metrics
from synthwatch.stream_apps.runtime.outbox import SpikeOutbox
from synthwatch.stream_apps.runtime.recovery import add_recovery
from synthwatch.stream_apps.runtime.state_tables import StateTables
from synthwatch.stream_apps.runtime.supervision import agent_failed, stopping_supervisor
from synthwatch.stream_apps.runtime.transport import unmarked, worker_app
from synthwatch.stream_apps.runtime.watchdog import watch_worker
from synthwatch.stream_apps.runtime.web import add_ready_view, add_sql_view
from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner, settings_worker_keys

__all__ = ["WorkerContext", "create_app", "default_partition"]


def create_app(ctx: WorkerContext, bootstrap_servers: str, web_port: int) -> faust.App:
    """Build the Faust app for one worker process (no module-level app: tests build several)."""
    settings = ctx.settings
    # An agent that raises stops the worker (exit 1) instead of a restart in place that took nothing more.
    app = worker_app(settings, bootstrap_servers, web_port, stopping_supervisor(agent_failed(ctx.metrics)))
    with unmarked(app):  # built by these calls, never discovered
        topics = Topics.of(app, settings)
        signer = WorkerSigner(settings_worker_keys(settings))
        tables = StateTables.create(app, ctx, signer)
        attach_metrics(app, ctx.metrics, topics=set(settings.all_topics))
        watch = watch_worker(app, ctx)
        agents = AgentContext(ctx, app, topics, signer, agent_batches(settings), partition_of=default_partition)
        outbox = SpikeOutbox(agents, tables)
        add_intake_agent(agents, tables, outbox)
        add_novelty_agent(agents, tables)
        add_storing_agents(agents)
        add_delivery_agent(agents)
        add_recovery(agents, tables, outbox)
        add_ready_view(app, ctx, watch)
        add_sql_view(app, ctx)
    return app
