"""A lab corrects a report that raised an alert: the officer alerted on it is told; a forged correction is not.

Real parts: the Tansu broker, a `synthwatch worker` process with its embedded ClickHouse and a subscriptions
file, `synthwatch publish`, and an HTTP webhook receiver that verifies every signature.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from synthwatch.stream_apps.detect.corrections import notice_id
from tests.conftest import isolated_settings, ndjson, run_cli, start_worker, stop_worker, wait_until
from tests.support.delivery_helpers import ThreadedReceiver, hook
from tests.support.factories import lab

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_officer_alerted_on_a_corrected_report_is_told_and_a_forged_correction_is_refused(
    broker: Any, tmp_path: Path
) -> None:
    prefix = f"cx{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC).isoformat()
    original = lab(
        event_id=f"{prefix}-1",
        occurred_at=now,
        substance={"name": f"Zyloxonitazene-{prefix}"},  # never seen: a new-substance alert
    )
    forged = lab(
        event_id=f"{prefix}-forged",
        lab_id="LAB-ELSEWHERE",
        occurred_at=now,
        corrects=original["event_id"],
        substance={"name": "Tramadol"},
    )
    genuine = lab(
        event_id=f"{prefix}-2",
        occurred_at=now,
        corrects=original["event_id"],
        substance={"name": "Protonitazene"},
    )
    with ThreadedReceiver() as hooks:
        subs = tmp_path / "subs.yaml"
        subs.write_text(
            "webhook_allowed_networks: [127.0.0.0/8]\nofficers:\n"
            "  - id: bko\n    name: Officer\n    language: en\n    immediate_min_severity: info\n"
            f"    routes:\n      - {{name: everything, channel: {hook(hooks.url, 'bko')}}}\n"
        )
        settings = isolated_settings(broker, tmp_path / "worker", subscriptions_file=subs)
        worker = start_worker(settings, tmp_path / "worker.log")
        try:

            def publish(name: str, record: dict[str, Any]) -> None:
                (tmp_path / name).write_text(ndjson([record]))
                done = run_cli(settings, "publish", str(tmp_path / name))
                assert done.returncode == 0, done.stdout + done.stderr

            publish("original.ndjson", original)
            cited_sql = "SELECT alert_id FROM alerts WHERE has(evidence_event_ids, {e:String}) ORDER BY alert_id"
            # The alert reached the officer and is stored (a notice is about stored alerts: docs/detection.md).
            alerts = wait_until(
                lambda: [r[0] for r in worker.query(cited_sql, {"e": original["event_id"]}).rows], 90, "the alert"
            )
            wait_until(lambda: all(a in hooks.accepted() for a in alerts), 60, f"delivery of {alerts}")
            delivered_sql = "SELECT count() FROM deliveries WHERE alert_id IN {a:Array(String)} AND status='delivered'"
            wait_until(lambda: worker.count(delivered_sql, {"a": alerts}) == len(alerts), 60, "deliveries recorded")

            publish("forged.ndjson", forged)
            (reject,) = worker.wait_rows(
                "SELECT stage, reason FROM rejects WHERE event_id = {e:String}",
                {"e": forged["event_id"]},
                1,
                "the forged correction's reject",
            )
            assert reject["stage"] == "worker"
            # Event ids are unique per reporter: another lab's correction names a report of its own lab, which it
            # does not have (the reason does not tell the forger that the id exists under another lab).
            assert (
                reject["reason"].startswith("corrects: event_id")
                and "not stored (yet) as a report of this lab" in (reject["reason"])
            )

            publish("genuine.ndjson", genuine)
            publish("again.ndjson", genuine)  # a re-send: a duplicate, no second notice
            expected = {notice_id(a, genuine["event_id"]) for a in alerts}
            wait_until(lambda: expected <= set(hooks.accepted()), 90, f"the notices {expected}; {worker.describe()}")
            stats = wait_until(
                lambda: (s := worker.stats())["consumed"] == 4 and s["duplicates"] == 1 and s, 60, "all four counted"
            )
            assert stats["stored"] + stats["rejected"] + stats["duplicates"] == stats["consumed"]
            assert stats["rejected"] == 1

            # Nobody was told about the forged correction; each notice came once.
            notices = {k: n for k, n in hooks.accepted().items() if k.startswith("correction:")}
            assert notices == dict.fromkeys(expected, 1)
            # Stored by the alerts agent at its own checkpoint, after the notices went out (delivery reads the
            # topic, not the table): waited for, not read at once (run 53 read it before that checkpoint).
            stored = worker.wait_rows(
                "SELECT alert_type, details FROM alerts WHERE alert_type = 'correction' AND has(evidence_event_ids, "
                "{e:String})",
                {"e": genuine["event_id"]},
                len(alerts),
                "the notices stored",
            )
            details = json.loads(stored[0]["details"])
            assert (details["old_substance"], details["new_substance"]) == (
                original["substance"]["name"],
                "Protonitazene",
            )
            assert details["counts_recomputed"] is False
            # The forged report is not stored; the original stays, marked corrected by the genuine one.
            rows = worker.query(
                "SELECT event_id, corrects FROM lab_detections WHERE startsWith(event_id, {p:String}) "
                "ORDER BY event_id",
                {"p": prefix},
            ).rows
            assert [tuple(r) for r in rows] == [(original["event_id"], ""), (genuine["event_id"], original["event_id"])]
            # From its correction on, the original no longer counts in the aggregates (migration 0012): two
            # reports stored, one counted, under the right substance.
            counted = (
                "SELECT sum(reports) FROM reports_daily WHERE substance_key = "
                "(SELECT any(substance_key) FROM lab_detections WHERE event_id = {e:String})"
            )
            assert worker.count(counted, {"e": original["event_id"]}) == 0
            assert worker.count(counted, {"e": genuine["event_id"]}) == 1
            assert worker.count("SELECT sum(reports) FROM reports_daily") == 1
            listed = run_cli(settings, "corrections", original["event_id"])
            assert listed.returncode == 0, listed.stderr
            assert genuine["event_id"] in listed.stdout and "1 corrected report" in listed.stdout
        finally:
            stop_worker(worker)
