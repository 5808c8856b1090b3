"""The ``delivery`` agent: alerts to the officers who subscribed (only when a subscriptions file is set).

The service and its agent live in :mod:`synthwatch.stream_apps.delivery.service`; this wires them into the
worker: the sink's lock (the embedded engine's client is shared with the other agents), the delivery
batching (:func:`.batches.delivery_batches`), the worker signature check and ``/deliveries/resend``.
"""

from __future__ import annotations

from synthwatch.stream_apps.runtime.batches import delivery_batches
from synthwatch.stream_apps.runtime.context import AgentContext
from synthwatch.stream_apps.runtime.web import add_resend_view


def add_delivery_agent(agents: AgentContext) -> None:
    """Define the ``delivery`` agent, its timers and ``/deliveries/resend`` when officers subscribe."""
    ctx, settings = agents.worker, agents.settings
    if settings.subscriptions_file is None:
        return
    from synthwatch.stream_apps.delivery.service import DeliveryService, attach_delivery

    # The organisations the intake verifies reports with: the immediate budget counts per organisation (one view of
    # the keys file for both, as the worker started)
    verifier = ctx.intake.verifier
    organisations = list(verifier.orgs.values()) if verifier is not None else []
    delivery = DeliveryService.from_settings(settings, ctx.client, lock=ctx.sink.lock, organisations=organisations)
    attach_delivery(
        agents.app, agents.topics.alerts, delivery, batches=delivery_batches(settings), accept=agents.signer.valid_event
    )
    add_resend_view(agents.app, ctx, delivery)
