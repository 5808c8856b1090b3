"""Event-id squatting through corrections: one lab may not touch another's reports by reusing its event ids.

Event ids are unique per reporter only (a lab's LIMS numbers its own samples, predictably), so lab A can
send reports and corrections under lab B's ids. Through the worker's own correction steps
(:func:`~synthwatch.stream_apps.runtime.corrections.judge_batch` before counting,
:func:`~synthwatch.stream_apps.runtime.corrections.correction_notices` at the checkpoint) on the real
embedded engine, intake and sink; only the worker's Kafka producer and its retry loop are stood in for
(:class:`_Agents`: what was sent is recorded, a ClickHouse call runs once).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, TypeVar

from synthwatch.schemas import Alert, AlertSubstance, Reject
from synthwatch.stream_apps.detect.intake import EnrichedEvent, Intake, RawMessage
from synthwatch.stream_apps.runtime.corrections import correction_notices, judge_batch
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.support.delivery_helpers import make_alert
from tests.support.factories import lab

T = TypeVar("T")
X, Y = "2026-000123", "2026-000124"  # B's next LIMS numbers, which A can guess


class _Agents:
    """The parts of the worker's AgentContext the correction steps use; sends are recorded, not produced."""

    def __init__(self, sink: ClickHouseSink, intake: Intake) -> None:
        self.worker = SimpleNamespace(sink=sink, intake=intake)
        self.topics = SimpleNamespace(alerts="alerts")
        self.settings = SimpleNamespace(topic_alerts="alerts")
        self.metrics = SimpleNamespace(produced=lambda topic, n: None)
        self.sent: list[Alert] = []

    async def with_retries(self, what: str, call: Callable[[], T]) -> T:
        return call()

    async def send(self, topic: Any, key: bytes, value: bytes) -> Awaitable[Any]:
        self.sent.append(Alert.model_validate_json(value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _take(agents: _Agents, *records: dict[str, Any], first: int = 0) -> tuple[list[EnrichedEvent], list[Reject]]:
    """One batch through the worker's steps: intake, judge the corrections, store, send the notices."""
    result = agents.worker.intake.process(
        [RawMessage(f"t:0:{first + i}", json.dumps(r)) for i, r in enumerate(records)]
    )
    assert not result.rejects, result.rejects
    rejects: list[Reject] = []

    async def steps() -> list[EnrichedEvent]:
        kept = await judge_batch(agents, result.events, [], rejects)  # type: ignore[arg-type]
        stored = agents.worker.sink.store_events(kept)
        await correction_notices(agents, [i for i in kept if i not in stored.changed])  # type: ignore[arg-type]
        return kept

    return asyncio.run(steps()), rejects


def _counted(ch: Any) -> list[tuple[str, int]]:
    """Reports per substance as the aggregates count them (corrected reports retracted)."""
    return [
        (str(key), int(n))
        for key, n in ch.query(
            "SELECT lower(substance_name) AS s, sum(reports) AS n FROM reports_daily GROUP BY s HAVING n != 0 "
            "ORDER BY s"
        ).result_rows
    ]


def test_a_squatted_report_and_correction_id_do_not_stop_the_owners_correction(ch: Any) -> None:
    """A sends a report under B's next id, then a correction under B's next one; B's genuine report and its
    correction under those ids are still judged against B's own report and take it out of the counts."""
    migrate(ch)
    agents = _Agents(ClickHouseSink(ch), Intake())
    _take(agents, lab(event_id=X, lab_id="LAB-A", substance={"name": "ketamine"}))
    _take(agents, lab(event_id=Y, lab_id="LAB-A", corrects=X, substance={"name": "cocaine"}), first=1)
    _take(agents, lab(event_id=X, lab_id="LAB-B", substance={"name": "isotonitazene"}), first=2)
    kept, rejects = _take(
        agents, lab(event_id=Y, lab_id="LAB-B", corrects=X, substance={"name": "protonitazene"}), first=3
    )
    assert [r.reason for r in rejects] == [] and len(kept) == 1
    assert ch.query("SELECT count() FROM retractions").result_rows[0][0] == 2  # A's and B's, each its own
    # Each lab's report counted once, under its corrected substance; B's misidentification no longer counts.
    assert _counted(ch) == [("cocaine", 1), ("protonitazene", 1)]


def test_a_correction_naming_another_labs_id_leaves_that_labs_report_alone(ch: Any) -> None:
    """A correction of A naming B's id corrects nothing of B's: refused (A has no report under that id)."""
    migrate(ch)
    agents = _Agents(ClickHouseSink(ch), Intake())
    _take(agents, lab(event_id=X, lab_id="LAB-B", substance={"name": "isotonitazene"}))
    kept, (refused,) = _take(
        agents, lab(event_id=Y, lab_id="LAB-A", corrects=X, substance={"name": "ketamine"}), first=1
    )
    assert kept == [] and refused.reason.startswith("corrects:")
    assert ch.query("SELECT count() FROM retractions").result_rows[0][0] == 0
    assert _counted(ch) == [("isotonitazene", 1)]


def _alert_on(item: EnrichedEvent, alert_id: str) -> Alert:
    """The new_substance alert a report raised: its substance, region and day; its evidence, the report's id."""
    day = item.event.occurred_at.replace(hour=0, minute=0, second=0, microsecond=0)
    substance = AlertSubstance(name=item.substance.display_name, key=item.substance.key, family=None)
    return make_alert(
        alert_id=alert_id,
        country=item.event.country,
        region=item.event.region,
        substance=substance,
        window_start=day,
        window_end=day + timedelta(days=1),
        triggered_at=item.event.occurred_at,
        evidence_event_ids=[item.event_id],
        reported_by=[item.event.lab_id],  # type: ignore[union-attr]
    )


def test_a_correction_of_a_squatted_id_sends_no_notice_on_the_owners_alert(ch: Any) -> None:
    """B's report X raised an alert (evidence: 'X'). A sends its own report under X and corrects it: no notice
    tells B's alert's recipients that the report behind it was corrected. B's own correction still does."""
    migrate(ch)
    agents = _Agents(ClickHouseSink(ch), Intake())
    (theirs,), _ = _take(agents, lab(event_id=X, lab_id="LAB-B", substance={"name": "isotonitazene"}))
    agents.worker.sink.store_alerts([_alert_on(theirs, "new-b")])
    _take(agents, lab(event_id=X, lab_id="LAB-A", region="FR-IDF", substance={"name": "ketamine"}), first=1)
    kept, rejects = _take(
        agents, lab(event_id=Y, lab_id="LAB-A", corrects=X, region="FR-IDF", substance={"name": "cocaine"}), first=2
    )
    assert len(kept) == 1 and rejects == []  # A may correct A's report
    assert agents.sent == []  # and tells nobody that B's was corrected
    _take(agents, lab(event_id=Y, lab_id="LAB-B", corrects=X, substance={"name": "protonitazene"}), first=3)
    (notice,) = agents.sent
    assert notice.alert_type == "correction" and notice.details["corrected_alert_id"] == "new-b"
    assert notice.reported_by == ["LAB-B"] and "isotonitazene -> Protonitazene" in notice.summary


def test_a_correction_of_an_id_nobody_else_holds_notifies_as_before(ch: Any) -> None:
    """Only one reporter holds the id: the alert citing it rests on that report, whatever else it says."""
    migrate(ch)
    agents = _Agents(ClickHouseSink(ch), Intake())
    _take(agents, lab(event_id=X, lab_id="LAB-B", substance={"name": "isotonitazene"}))
    agents.worker.sink.store_alerts([make_alert(alert_id="spike-b", alert_type="spike", evidence_event_ids=["o", X])])
    _take(agents, lab(event_id=Y, lab_id="LAB-B", corrects=X, substance={"name": "protonitazene"}), first=1)
    assert [n.details["corrected_alert_id"] for n in agents.sent] == ["spike-b"]
