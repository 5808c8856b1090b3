"""The worker's own web pages: ``/ready``, ``/sql`` and ``/deliveries/resend`` (``/metrics``: :mod:`.metrics`).

``/sql`` and ``/deliveries/resend`` are for commands on this machine that cannot open the embedded engine
while this process holds it: token, loopback Host, no Origin, JSON only (:mod:`.web_auth`). Faust's own
views (``/table/``, ``/router/``, ``/graph/``, stats) are off (:func:`.transport.worker_app`).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import faust
from faust.web import Request, Response, View

from synthwatch.settings import Settings
from synthwatch.stream_apps.runtime.context import WorkerContext
from synthwatch.stream_apps.runtime.watchdog import StallWatch
from synthwatch.stream_apps.runtime.web_auth import refuse_request
from synthwatch.stream_apps.storage.query import AnalystSessions, QueryError

if TYPE_CHECKING:
    from synthwatch.stream_apps.delivery.service import DeliveryService

#: Largest ``/deliveries/resend`` request (it names one delivery id).
RESEND_MAX_BYTES = 4096


def refused_response(
    view: View, request: Request, token: str | None, settings: Settings, limit: int
) -> Response | None:
    """The answer to a request that may not run (:func:`.web_auth.refuse_request`, or a declared body over
    ``limit`` bytes), or None when it may."""
    refused = refuse_request(request.headers, token, settings.web_allowed_hosts)
    if refused is not None:
        return view.json({"error": refused[1]}, status=refused[0])
    declared = request.headers.get("Content-Length", "0")
    if not declared.isdigit() or int(declared) > limit:
        return view.json({"error": f"request over {limit} bytes"}, status=413)
    return None


def add_ready_view(app: faust.App, ctx: WorkerContext, watch: StallWatch) -> None:
    """``/ready``: the worker's counters, 503 until detector state is recovered or while it is stalled."""
    stats = ctx.metrics.stats

    @app.page("/ready")
    class ReadyView(View):
        async def get(self, request: Request) -> Response:
            # Not ready until detector state is recovered, nor while the watchdog finds a partition stalled
            # after a seek back: an orchestrator's probe then restarts the worker. Nor once an agent failed
            # (``failed`` says which and why): the worker is stopping (:mod:`.supervision`).
            ready = stats.ready_seconds is not None and watch.healthy and stats.failed is None
            body = {"ready": ready, "stalled": watch.reason() or None, **stats.__dict__}
            return self.json(body, status=200 if ready else 503)


def add_sql_view(app: faust.App, ctx: WorkerContext) -> None:
    """``/sql``: analysts' SELECTs on read-only sessions of their own."""
    settings = ctx.settings
    # A pool of its own: analysts' queries (each up to sql_max_seconds) must never take the default
    # executor's threads, which the sink's ClickHouse calls run on.
    analysts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="analyst-sql")
    sessions = AnalystSessions(settings)

    @app.page("/sql")
    class SqlView(View):
        """Analysts' SELECTs, for commands that cannot open the embedded engine while this process holds it.

        They run on read-only chDB handles of their own, one per thread of a two-thread pool
        (:class:`synthwatch.stream_apps.storage.query.AnalystSessions`), never on the sink's client and never under the
        sink's lock: a slow query cannot stall ingestion.
        """

        async def post(self, request: Request) -> Response:
            limit = settings.sql_max_body_bytes
            refused = refused_response(self, request, ctx.web_token, settings, limit)
            if refused is not None:
                return refused
            body = await request.read()
            if len(body) > limit:
                return self.json({"error": f"request over {limit} bytes"}, status=413)
            try:
                payload = json.loads(body)
                sql, parameters = str(payload["sql"]), payload.get("parameters") or None
                if parameters is not None and not isinstance(parameters, dict):
                    raise TypeError("parameters must be an object")
            except (ValueError, KeyError, TypeError) as error:
                return self.json({"error": f'send {{"sql": "SELECT ...", "parameters": {{}}}} ({error})'}, status=400)
            try:
                await ctx.until_storage_open()  # the analysts' handles open on the worker's engine
                result = await asyncio.get_running_loop().run_in_executor(
                    analysts, partial(sessions.run, sql, parameters)
                )
            except QueryError as error:
                return self.json({"error": str(error)}, status=400)
            return self.json({"columns": result.columns, "rows": result.rows})


def add_resend_view(app: faust.App, ctx: WorkerContext, delivery: DeliveryService) -> None:
    """``/deliveries/resend``: ``synthwatch deliveries resend ID`` while this process holds the embedded engine."""
    settings = ctx.settings

    @app.page("/deliveries/resend")
    class ResendView(View):
        """``synthwatch deliveries resend ID`` while this process holds the embedded engine (same token as
        ``/sql``): the delivery is sent by this worker's service, with its endpoints and records."""

        async def post(self, request: Request) -> Response:
            from synthwatch.stream_apps.delivery.service import ResendError

            refused = refused_response(self, request, ctx.web_token, settings, RESEND_MAX_BYTES)
            if refused is not None:
                return refused
            body = await request.read()
            try:
                wanted = str(json.loads(body)["delivery_id"])
            except (ValueError, KeyError, TypeError) as error:
                return self.json({"error": f'send {{"delivery_id": "d_..."}} ({error})'}, status=400)
            try:
                outcome = await delivery.resend(wanted)
            except ResendError as error:
                return self.json({"error": str(error)}, status=409)
            return self.json({"status": outcome.status, "attempts": outcome.attempts, "reason": outcome.reason})
