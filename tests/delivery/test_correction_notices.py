"""Correction notices: rendered in every language with hostile text escaped, sent to whoever got the alert."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from synthwatch.schemas import Alert, parse_event_object
from synthwatch.stream_apps.delivery.messages import LANGUAGES, render_alert
from synthwatch.stream_apps.delivery.service import DeliveryService, RetryPolicy
from synthwatch.stream_apps.delivery.subscriptions import parse_subscriptions
from synthwatch.stream_apps.detect.corrections import ReportFacts, correction_notice
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.deliveries import DeliveryStore
from tests.support.delivery_helpers import WebhookReceiver, cited, make_alert, subscriptions_yaml
from tests.support.factories import lab

HOSTILE = "<script>alert(1)</script>\nFrom: evil@x \u202etxt"
FAST = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.05, jitter=0.0)


def _notice(alert: Alert, old_substance: str = "isotonitazene", new_name: str = "protonitazene") -> Alert:
    old = ReportFacts("lab-1", "lab_detection", "lab:LAB-FR-01", old_substance)
    new = parse_event_object(lab(event_id="lab-2", corrects="lab-1", substance={"name": new_name}))
    return correction_notice(cited(alert), old, new, new_name, datetime.now(UTC))


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_notice_says_which_alert_which_report_what_changed_and_that_counts_stay(language: str) -> None:
    alert = make_alert(alert_id="new-abc")
    message = render_alert(_notice(alert), language, "https://grafana.example")
    for text in (message.subject, message.text, message.html):
        assert "new-abc" in text and "isotonitazene" in text and "protonitazene" in text
    assert "lab-1" in message.text and "lab-2" in message.text
    assert "\n" not in message.subject
    recomputed = {"en": "not recomputed", "fr": "ne sont pas recalculés", "ar": "لا يُعاد حساب"}[language]
    assert recomputed in message.text and recomputed in message.html


@pytest.mark.parametrize("language", LANGUAGES)
def test_hostile_report_text_is_escaped_in_every_part(language: str) -> None:
    message = render_alert(_notice(make_alert(), old_substance=HOSTILE), language, "https://grafana.example")
    assert "<script>" not in message.html and "&lt;script&gt;" in message.html
    assert "\nFrom: evil" not in message.text and "\\nFrom: evil" in message.text  # no forged line
    assert "\u202e" not in message.text + message.html + message.subject
    assert "\n" not in message.subject


def test_a_notice_goes_to_those_who_received_the_alert_and_nobody_else(ch: Any) -> None:
    migrate(ch)
    alert = make_alert(alert_id="new-abc")

    async def scenario() -> tuple[WebhookReceiver, list[Any], list[Any], list[Any]]:
        async with WebhookReceiver() as hooks:
            subscriptions = parse_subscriptions(subscriptions_yaml(hooks), allowed_networks=("127.0.0.0/8",))
            service = DeliveryService(
                subscriptions, DeliveryStore(ch), policy=FAST, store_retries=3, allowed_networks=("127.0.0.0/8",)
            )
            first = await service.handle(alert)
            told = await service.handle(_notice(alert))
            # A notice about an alert nobody received (never delivered) goes to nobody.
            nobody = await service.handle(_notice(make_alert(alert_id="never-sent")))
            await service.close()
            return hooks, first, told, nobody

    hooks, first, told, nobody = asyncio.run(scenario())
    # The Paris officer's route matches but the alert never reached him (no SMTP server: gave up).
    assert {(o.officer_id, o.status) for o in first} == {("ml-bko-douanes", "delivered"), ("fr-paris-ofast", "gave_up")}
    assert [(o.officer_id, o.channel, o.status) for o in told] == [("ml-bko-douanes", "webhook", "delivered")]
    assert nobody == []
    alert_request, notice_request = hooks.on("bamako")
    payload = notice_request.json()
    assert notice_request.status == 200 and payload["alert"]["alert_type"] == "correction"
    assert payload["alert"]["details"]["corrected_alert_id"] == "new-abc" and payload["language"] == "fr"
    assert "Rectification" in payload["subject"] and "isotonitazene → protonitazene" in payload["text"]
    assert json.loads(alert_request.body)["alert_id"] == "new-abc"
