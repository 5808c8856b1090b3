"""Becoming ready: detector state recovered from the changelogs (or rebuilt from ClickHouse), kept spike
alerts sent, the worker marked ready; and what a rebalance does to the state held in memory."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from functools import partial
from typing import Any, cast

from synthwatch.stream_apps.runtime.context import AgentContext, WorkerContext, send_all
from synthwatch.stream_apps.runtime.heap import start_heap_trimmer
from synthwatch.stream_apps.runtime.memtrace import install_snapshot_on_signal
from synthwatch.stream_apps.runtime.outbox import SpikeOutbox
from synthwatch.stream_apps.runtime.state_tables import StateTables
from synthwatch.stream_apps.storage.state_rebuild import learn_names, rebuild

log = logging.getLogger("synthwatch.stack.worker")


def learn_names_locked(ctx: WorkerContext) -> int:
    """Teach the resolver the names stored in ClickHouse while holding the client lock."""
    with ctx.sink.lock:
        return learn_names(
            ctx.client, ctx.intake.resolver, ctx.intake.stored_reporter, ctx.intake.limits.max_future_hours
        )


def rebuild_locked(ctx: WorkerContext) -> Any:
    """Rebuild detector state from ClickHouse while holding the client lock."""
    with ctx.sink.lock:
        return rebuild(
            ctx.client,
            ctx.regions,
            ctx.novelty,
            ctx.intake.resolver,
            ctx.intake.stored_reporter,
            ctx.intake.limits.max_future_hours,
        )


def freeze_long_lived_objects(thresholds: tuple[int, int, int]) -> None:
    """What exists now lives as long as the worker: keep it out of every later collection, and collect with
    ``thresholds`` (``SYNTHWATCH_GC_THRESHOLDS``): each collection holds the event loop while it walks."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


async def recover_state(agents: AgentContext, tables: StateTables, outbox: SpikeOutbox) -> None:
    """Once ClickHouse is open and the tables are recovered: rebuild empty state from ClickHouse, or learn the
    stored names and send the spike alerts kept in the recovered state; then mark the worker ready."""
    app, ctx, settings, stats = agents.app, agents.worker, agents.settings, agents.metrics.stats
    # ClickHouse opens and migrates in a thread meanwhile, and the resolver gets its catalogue in another
    # (run_worker): a failure of either stops the worker here.
    await ctx.until_storage_open()
    await ctx.until_prepared()
    await cast(Any, app.tables).recovery.completed.wait()
    if tables.empty:
        report = await asyncio.get_running_loop().run_in_executor(None, partial(rebuild_locked, ctx))
        stats.rebuild = report.__dict__
        n, partition_of = settings.partitions, agents.partition_of
        region_changes = [(partition_of(r.encode(), n), k, v) for r, k, v in ctx.regions.drain_dirty()]
        substance_changes = [(partition_of(k.encode(), n), k, v) for k, v in ctx.novelty.drain_dirty()]
        pending = await tables.save(tables.regions, region_changes)
        pending += await tables.save(tables.substances, substance_changes)
        await send_all(pending)
        await tables.seal(tables.regions, region_changes)
        await tables.seal(tables.substances, substance_changes)
        log.info("detector state rebuilt from ClickHouse: %s", report)
    else:
        learnt = await asyncio.get_running_loop().run_in_executor(None, partial(learn_names_locked, ctx))
        stats.rebuild = {"names_learnt": learnt}
        log.info("detector state recovered from the changelogs; %d names learnt from ClickHouse", learnt)
        resent = await outbox.send_kept()
        if resent:
            log.info("%d spike alert(s) kept in state before a restart sent again", resent)
    if settings.gc_freeze:
        freeze_long_lived_objects(settings.gc_thresholds)
    agents.metrics.watch_collections()
    start_heap_trimmer(settings.heap_trim_seconds, agents.metrics.heap_trimmed)
    install_snapshot_on_signal(settings.tracemalloc_dump)
    ctx.state_ready = True
    agents.metrics.set_ready()
    stats.ready_seconds = time.monotonic() - ctx.started_at
    if ctx.on_ready is not None:
        ctx.on_ready(stats.ready_seconds)


def add_recovery(agents: AgentContext, tables: StateTables, outbox: SpikeOutbox) -> None:
    """Wire readiness (:func:`recover_state`), rebalances and the kept outboxes of partitions taken over."""
    app, ctx = agents.app, agents.worker

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's stub wants a keyword-only signal
    async def forget_state(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Another worker may own these regions now; reload from the tables when they come back.
        ctx.regions.forget()
        ctx.novelty.forget()

    async def after_rebalance() -> None:
        """Partitions taken over from a worker that stopped or died: their kept spike alerts go out now,
        not when their series next gets a report (which may be never). The first recovery is
        :func:`recover_state`'s (it may rebuild state first)."""
        if not ctx.state_ready:
            return
        resent = await outbox.send_kept()
        if resent:
            log.info("%d spike alert(s) kept in the state of partitions taken over sent", resent)

    cast(Any, app).after_recovery.append(after_rebalance)

    async def announce_ready() -> None:
        await recover_state(agents, tables, outbox)

    app.task(announce_ready)
