"""Corrections in the worker: refuse the ones that may not correct what they name, notify on the rest.

Two steps, both batched (:mod:`synthwatch.stream_apps.storage.corrections`):

- :func:`judge_batch` runs before the region stage, so a refused correction is never counted: the reports
  a batch's corrections name are looked up in one query per table (none for a batch without a
  correction), with the reports taken since the last checkpoint (not stored yet) counted as known.
- :func:`correction_notices` runs at the checkpoint, once the corrections are stored: every stored alert
  whose evidence names a corrected report gets a ``correction`` notice on the alerts topic, which the alerts
  agent stores and the delivery agent sends to whoever received that alert. Ids are deterministic, so a
  replayed checkpoint sends the same notices again and both skip them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from synthwatch.schemas import Alert, Reject
from synthwatch.stream_apps.detect.corrections import (
    CitedAlert,
    ReportFacts,
    ReportKey,
    corrected_key,
    correction_notice,
    judge_corrections,
    known_reports,
    rests_on,
)
from synthwatch.stream_apps.detect.intake import EnrichedEvent
from synthwatch.stream_apps.runtime.context import AgentContext, send_all
from synthwatch.stream_apps.storage.corrections import alerts_citing, reporters_under, stored_reports


async def judge_batch(
    agents: AgentContext, events: list[EnrichedEvent], pending: Iterable[EnrichedEvent], rejects: list[Reject]
) -> list[EnrichedEvent]:
    """``events`` without the corrections that may not correct what they name (their rejects go to ``rejects``)."""
    named = {key for item in events if (key := corrected_key(item.event)) is not None}  # (reporter, id)
    if not named:
        return events
    pending = list(pending)
    # Reports taken since the last checkpoint are known without asking ClickHouse (they are not stored yet).
    wanted = sorted(named - {item.key for item in pending})
    sink = agents.worker.sink

    def lookup() -> dict[ReportKey, ReportFacts]:
        with sink.lock:
            return stored_reports(sink.client, wanted)

    stored = await agents.with_retries("checking corrected reports", lookup) if wanted else {}
    known = known_reports(stored, pending, named)
    judged = judge_corrections(events, known, agents.worker.intake.stored_reporter)
    rejects.extend(judged.rejects)
    return judged.kept


async def correction_notices(agents: AgentContext, stored: Sequence[EnrichedEvent]) -> list[Alert]:
    """Send a notice for every stored alert resting on a report that ``stored`` (just stored) corrects."""
    corrections = [item for item in stored if item.event.corrects is not None]
    if not corrections:
        return []
    sink = agents.worker.sink
    old_keys = sorted({key for item in corrections if (key := corrected_key(item.event)) is not None})
    old_ids = sorted({event_id for _, event_id in old_keys})

    def lookup() -> tuple[dict[ReportKey, ReportFacts], list[CitedAlert], dict[str, set[str]]]:
        with sink.lock:
            client = sink.client
            return stored_reports(client, old_keys), alerts_citing(client, old_ids), reporters_under(client, old_ids)

    originals, alerts, holders = await agents.with_retries("reading corrected reports and their alerts", lookup)
    now = datetime.now(UTC)
    notices: list[Alert] = []
    for item in corrections:
        target = corrected_key(item.event)
        old = originals.get(target) if target is not None else None
        if old is None:
            continue
        for alert in alerts:
            if rests_on(alert, old, holders.get(old.event_id, ())):  # not another reporter's under the id
                notices.append(correction_notice(alert, old, item.event, item.substance.display_name, now))
    topic = agents.topics.alerts
    await send_all([await agents.send(topic, n.alert_id.encode(), n.model_dump_json().encode()) for n in notices])
    agents.metrics.produced(agents.settings.topic_alerts, len(notices))
    return notices
