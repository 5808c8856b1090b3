"""Alert delivery on real parts: an aiohttp webhook receiver and an aiosmtpd server started by each test on
free loopback ports, and the embedded ClickHouse (``ch``) holding the ``deliveries`` table.

What an officer would notice is what is checked: content and language, signatures, one message per
(alert, officer, channel) across a restart or a replay, retries that end in a delivery or a recorded give-up,
and that a hanging channel delays nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, get_args
from urllib.parse import parse_qs, urlsplit

import faust
import pytest
import typer
from aiohttp import web
from babel.dates import format_date
from typer.testing import CliRunner

from synthwatch.bench.delivery import (
    LatencyReceiver,
    bench_subscriptions,
    lab_report,
    nitazene_variants,
    percentile,
    stack_env,
)
from synthwatch.catalogue import Family
from synthwatch.cli.delivery import register
from synthwatch.schemas import Alert, parse_event_object
from synthwatch.settings import Settings
from synthwatch.stack.broker import free_port
from synthwatch.stream_apps.delivery.email import SmtpConfig, SmtpConfigError, message_id
from synthwatch.stream_apps.delivery.endpoints import Endpoint, EndpointLimits
from synthwatch.stream_apps.delivery.messages import (
    DIGEST_MAX_LISTED,
    FAMILIES,
    LANGUAGES,
    TEMPLATE_DIR,
    drilldown_url,
    number,
    render_alert,
    render_digest,
)
from synthwatch.stream_apps.delivery.service import DeliveryService, RetryPolicy, attach_delivery
from synthwatch.stream_apps.delivery.subscriptions import (
    Subscriptions,
    SubscriptionsError,
    parse_subscriptions,
    recipients,
)
from synthwatch.stream_apps.delivery.targets import TargetPolicy
from synthwatch.stream_apps.delivery.webhook import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    WebhookRejected,
    WebhookSender,
    delivery_id,
    sign,
    verify,
    webhook_headers,
)
from synthwatch.stream_apps.detect.identity import SubstanceResolver
from synthwatch.stream_apps.runtime.batches import channel_batches
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.deliveries import DeliveryStore
from tests.support.delivery_helpers import (
    LOOPBACK,
    SECRET,
    SmtpServer,
    WebhookReceiver,
    hook,
    make_alert,
    secret_for,
    subscriptions_yaml,
)

FAST = RetryPolicy(max_attempts=3, base_delay_s=0.05, max_delay_s=0.2, jitter=0.0)
GRAFANA = "https://grafana.example.org"


@pytest.fixture
def db(ch: Any) -> Any:
    migrate(ch)
    return ch


def _service(db: Any, subscriptions: Subscriptions | str, **options: Any) -> DeliveryService:
    if isinstance(subscriptions, str):
        subscriptions = parse_subscriptions(subscriptions, allowed_networks=LOOPBACK)
    options = {"policy": FAST, "grafana_url": GRAFANA, "store_retries": 3, "allowed_networks": LOOPBACK, **options}
    return DeliveryService(subscriptions, DeliveryStore(db), **options)


def _rows(db: Any, where: str = "1") -> list[dict[str, Any]]:
    return list(
        db.query(
            "SELECT alert_id, officer_id, channel, route, attempt, toString(status) AS status, reason, response_code, "
            f"target, duration_ms, digest_id, alert_json FROM deliveries WHERE {where} ORDER BY at, attempt"
        ).named_results()
    )


def _officer(officer_id: str, channel: str, *, language: str = "en", extra: str = "", route: str = "") -> str:
    return (
        f"  - id: {officer_id}\n    name: {officer_id.title()}\n    language: {language}\n{extra}"
        f"    routes:\n      - {{{route}channel: {channel}}}\n"
    )


def _smtp(server: SmtpServer, **changes: Any) -> SmtpConfig:
    return replace(SmtpConfig("127.0.0.1", server.port, starttls=False, sender="alerts@synthwatch.example"), **changes)


# --- schema ------------------------------------------------------------------------------------------------


def test_deliveries_table_is_keyed_for_its_two_questions(db: Any) -> None:
    (row,) = db.query(
        "SELECT engine, sorting_key FROM system.tables WHERE database = currentDatabase() AND name = 'deliveries'"
    ).result_rows
    assert row == ("MergeTree", "officer_id, alert_id, channel, at")
    columns = {r[0] for r in db.query("DESCRIBE TABLE deliveries").result_rows}
    assert {
        "alert_id",
        "officer_id",
        "channel",
        "route",
        "attempt",
        "status",
        "reason",
        "response_code",
        "at",
    } <= columns
    assert "duration_ms" in columns


# --- messages ----------------------------------------------------------------------------------------------


def test_every_language_has_every_template_and_every_family() -> None:
    names = {p.name for p in (TEMPLATE_DIR / "en").iterdir()}
    assert names >= {"alert_subject.txt.j2", "alert.txt.j2", "alert.html.j2", "digest.txt.j2", "digest.html.j2"}
    for language in LANGUAGES:
        assert {p.name for p in (TEMPLATE_DIR / language).iterdir()} == names
        assert set(FAMILIES[language]) == {*get_args(Family), ""}
        assert all(label and len(why) > 40 for label, why in FAMILIES[language].values())


def test_alert_message_says_what_where_how_unusual_why_and_links_to_grafana() -> None:
    spike = make_alert(
        alert_type="spike",
        severity="warning",
        region="FR-75C",
        country="FR",
        metric="count",
        observed=14.0,
        expected=2.5,
        substance={"name": "3-MMC", "key": "mmc-key", "family": "synthetic_cathinone", "controlled": True},
    )
    en, fr = render_alert(spike, "en", GRAFANA), render_alert(spike, "fr", GRAFANA)
    assert en.subject == "[synthwatch Warning] Spike: 3-MMC – Paris, France"
    assert fr.subject == "[synthwatch Avertissement] Pic : 3-MMC – Paris, France"
    assert "14 reports in 1 day against 2.5 expected (5.6 times the usual level)" in en.text
    assert "14 signalements en 1 jour, contre 2,5 attendus (5,6 fois le niveau habituel)" in fr.text
    assert "synthetic cathinone; under international control" in en.text and "Why it matters: Synthetic" in en.text
    assert (
        "cathinone de synthèse ; substance sous contrôle international" in fr.text
        and "Pourquoi c'est important" in fr.text
    )
    assert "Where: Paris (FR-75C), France." in en.text and "Où : Paris (FR-75C), France." in fr.text
    for message in (en, fr):
        assert message.links == (drilldown_url(GRAFANA, spike),)
        assert message.links[0] in message.text and message.links[0].replace("&", "&amp;") in message.html
    query = parse_qs(urlsplit(en.links[0]).query)
    assert urlsplit(en.links[0]).path == "/d/synthwatch-substance"
    assert (
        query["var-region"] == ["FR-75C"] and query["var-substance"] == ["mmc-key"] and query["var-country"] == ["FR"]
    )
    assert int(query["from"][0]) < spike.window_start.timestamp() * 1000 < int(query["to"][0])


def test_network_wide_alerts_name_their_regions_and_link_to_all_regions() -> None:
    spread = make_alert(
        alert_type="spread",
        region=None,
        country=None,
        observed=3.0,
        expected=3.0,
        details={"regions": ["ML-BKO", "SN-DK"]},
    )
    text = render_alert(spread, "fr", GRAFANA).text
    assert "sur l'ensemble du réseau : ML-BKO, SN-DK" in text and "signalée dans 3 régions" in text
    query = parse_qs(urlsplit(drilldown_url(GRAFANA, spread)).query)
    assert query["var-region"] == query["var-country"] == ["$__all"]


def test_html_escapes_what_reporters_wrote_and_subjects_stay_on_one_line() -> None:
    alert = make_alert(substance={"name": "<script>x</script>\nBcc: a@b.c", "key": "k", "family": None})
    message = render_alert(alert, "en", GRAFANA)
    assert "<script>" not in message.html and "&lt;script&gt;" in message.html
    assert "\n" not in message.subject
    assert "unclassified structure" in message.text


def test_an_alert_raised_by_a_late_report_says_how_late_in_every_message() -> None:
    late = make_alert(alert_type="new_substance", reported_late=True, late_by_hours=362.0)
    on_time = make_alert(alert_type="new_substance")
    en, fr = render_alert(late, "en", GRAFANA), render_alert(late, "fr", GRAFANA)
    assert "Reported late: the report occurred 362 hours (15.1 days) before the newest report" in en.text
    assert "Reported late</th>" in en.html and "362 hours (15.1 days)" in en.html
    assert "Signalement tardif : le signalement date de 362 heures (15,1 jours)" in fr.text
    assert "Signalement tardif</th>" in fr.html
    digest = render_digest([late, on_time], "en", GRAFANA, date(2026, 3, 10), "Jo")
    assert digest.text.count("Reported late:") == 1 and digest.html.count("Reported late:") == 1
    for message in (render_alert(on_time, "en", GRAFANA), render_alert(on_time, "fr", GRAFANA)):
        assert "Reported late" not in message.text and "Signalement tardif" not in message.text


def test_numbers_are_written_the_way_each_language_writes_them() -> None:
    assert (number(14500, "en"), number(14500, "fr")) == ("14,500", "14\u202f500")
    assert (number(2300.5, "en"), number(2300.5, "fr")) == ("2,300.5", "2\u202f300,5")
    assert (number(0.25, "en"), number(0.25, "fr"), number(0.001, "en")) == ("0.25", "0,25", "<0.01")


def test_digest_lists_the_most_severe_first_in_the_readers_language() -> None:
    info = make_alert(alert_id="i" * 24, severity="info", substance={"name": "Ketamine", "key": "k", "family": None})
    critical = make_alert(alert_id="c" * 24)
    message = render_digest([info, critical], "fr", GRAFANA, date(2026, 3, 10), "Awa Ndiaye")
    assert message.subject == "[synthwatch] Résumé quotidien du 10 mars 2026 : 2 alertes"
    assert message.text.index("Pentyloxynitazene") < message.text.index("Ketamine")
    assert message.text.startswith("Bonjour Awa Ndiaye") and len(message.links) == 2


# --- webhook signatures ------------------------------------------------------------------------------------


def test_verify_accepts_a_signed_request_once_and_refuses_tampering_replays_and_other_secrets() -> None:
    body = json.dumps({"kind": "alert", "delivery_id": "d_1", "alert_id": "a1", "officer_id": "bko"}).encode()
    now = 1_770_000_000.0
    headers = webhook_headers(SECRET, body, "d_1", "alert", now)
    assert re.fullmatch(r"t=1770000000,v1=[0-9a-f]{64}", headers[SIGNATURE_HEADER])
    expected = hmac.new(SECRET.encode(), b"1770000000.d_1.alert." + body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER].endswith(expected)  # the documented scheme, computed independently
    seen: set[str] = set()
    lower = {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive
    verified = verify(SECRET, lower, body, now=now + 10, seen=seen)
    assert (verified.delivery_id, verified.event, verified.payload["alert_id"]) == ("d_1", "alert", "a1")

    def refused(secret: str, h: dict[str, str], b: bytes, at: float = now) -> int:
        with pytest.raises(WebhookRejected) as caught:
            verify(secret, h, b, now=at, seen=seen)
        return caught.value.status

    assert refused(SECRET, headers, body) == 409  # the same delivery again (a replay inside the window)
    other = json.dumps({"kind": "alert", "delivery_id": "d_2", "alert_id": "a1", "officer_id": "bko"}).encode()
    fresh = webhook_headers(SECRET, other, "d_2", "alert", now)
    assert refused(SECRET, fresh, other + b" ") == 401  # body changed
    assert refused("another-officers-secret", fresh, other) == 401  # another subscriber cannot sign for this one
    later = f"t={int(now) + 1},v1={fresh[SIGNATURE_HEADER].split('v1=')[1]}"
    assert refused(SECRET, {**fresh, SIGNATURE_HEADER: later}, other) == 401  # the timestamp is signed
    assert refused(SECRET, {**fresh, DELIVERY_HEADER: "d_3"}, other) == 401  # so is the delivery id
    assert refused(SECRET, {**fresh, EVENT_HEADER: "digest"}, other) == 401  # and the event
    assert refused(SECRET, fresh, other, now + 301) == 400  # captured and replayed later
    assert refused(SECRET, fresh, other, now - 301) == 400
    assert refused(SECRET, {"Idempotency-Key": "d_2"}, other) == 401  # unsigned
    lying = json.dumps({"kind": "alert", "delivery_id": "d_9", "alert_id": "a1", "officer_id": "bko"}).encode()
    assert refused(SECRET, webhook_headers(SECRET, lying, "d_4", "alert", now), lying) == 400  # body id != signed id
    assert verify(["old-secret-being-rotated", SECRET], fresh, other, now=now, seen=seen).delivery_id == "d_2"
    assert "d_4" not in seen  # refused requests are not remembered
    with pytest.raises(ValueError, match="delivery id"):
        webhook_headers(SECRET, body, "d.1", "alert", now)  # a dot would make the signed string ambiguous


def test_delivery_ids_are_per_officer_and_stable_across_retries() -> None:
    assert delivery_id("a1", "bko", "webhook") == delivery_id("a1", "bko", "webhook")
    assert len({delivery_id("a1", "bko", "webhook"), delivery_id("a1", "dkr", "webhook"), delivery_id("a1")}) == 3
    assert re.fullmatch(r"d_[0-9a-f]{32}", delivery_id("a1", "bko", "webhook"))


# --- channels against real servers --------------------------------------------------------------------------


def test_webhook_is_signed_in_the_officers_language_with_a_delivery_id_per_officer(db: Any) -> None:
    alert = make_alert()

    async def scenario() -> tuple[WebhookReceiver, list[Any], float]:
        async with WebhookReceiver() as hooks:
            service = _service(db, subscriptions_yaml(hooks))
            started = time.time()
            outcomes = await service.handle(alert)
            await service.close()
            return hooks, outcomes, started

    hooks, outcomes, started = asyncio.run(scenario())
    (request,) = hooks.on("bamako")
    assert request.status == 200  # the receiver verified signature, timestamp and key
    headers = request.headers
    payload = request.json()
    signed_id = delivery_id(alert.alert_id, "ml-bko-douanes", "webhook")
    assert headers[DELIVERY_HEADER] == headers["Idempotency-Key"] == payload["delivery_id"] == signed_id
    assert headers[EVENT_HEADER] == payload["kind"] == "alert" and payload["alert_id"] == alert.alert_id
    timestamp = int(headers[SIGNATURE_HEADER].split(",")[0].removeprefix("t="))
    assert abs(timestamp - started) < 5
    assert headers[SIGNATURE_HEADER] == sign(
        secret_for("ml-bko-douanes"), request.body, delivery_id=signed_id, event="alert", timestamp=timestamp
    )
    assert (payload["officer_id"], payload["route"], payload["language"]) == ("ml-bko-douanes", "opioides-mali", "fr")
    assert payload["subject"] == "[synthwatch CRITIQUE] Nouvelle substance : Pentyloxynitazene – Bamako, Mali"
    assert "jamais signalée sur le réseau auparavant ; 1 signalement observé, contre 0 attendu." in payload["text"]
    assert "nitazène (opioïde benzimidazolé)" in payload["text"] and "naloxone" in payload["text"]
    assert payload["link"] == drilldown_url(GRAFANA, alert)
    assert Alert.model_validate(payload["alert"]) == alert
    by_officer = {o.officer_id: o for o in outcomes}
    assert by_officer["ml-bko-douanes"].status == "delivered"
    # the Paris officer is on e-mail and this service has no SMTP server: a recorded give-up, not a crash
    assert by_officer["fr-paris-ofast"].status == "gave_up" and "no SMTP server" in by_officer["fr-paris-ofast"].reason
    rows = {r["channel"]: r for r in _rows(db)}
    assert (rows["webhook"]["status"], rows["webhook"]["attempt"], rows["webhook"]["response_code"]) == (
        "delivered",
        1,
        200,
    )
    assert rows["webhook"]["target"] == hooks.url("bamako") and rows["webhook"]["route"] == "opioides-mali"
    assert (rows["email"]["status"], rows["email"]["attempt"]) == ("gave_up", 1)


def test_email_carries_text_and_html_in_english_with_a_stable_message_id(db: Any) -> None:
    alert = make_alert()
    with SmtpServer() as smtp:

        async def scenario() -> list[Any]:
            async with WebhookReceiver() as hooks:
                service = _service(db, subscriptions_yaml(hooks), smtp=_smtp(smtp))
                outcomes = await service.handle(alert)
                await service.close()
                return outcomes

        outcomes = asyncio.run(scenario())
    assert {o.status for o in outcomes} == {"delivered"}
    ((mail_from, recipients_, message),) = smtp.messages
    assert (mail_from, recipients_) == ("alerts@synthwatch.example", ["j.martin@ofast.example.fr"])
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == "[synthwatch CRITICAL] New substance: Pentyloxynitazene – Bamako, Mali"
    assert message["Content-Language"] == "en" and message["X-Synthwatch-Alert-Id"] == alert.alert_id
    assert message["Message-ID"] == f"<{message_id(alert.alert_id, 'fr-paris-ofast', 'email')}@synthwatch.example>"
    plain = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "How unusual: never reported anywhere in the network before; 1 report observed, 0 expected." in plain
    assert "Why it matters: Nitazenes are synthetic opioids" in plain and "Where: Bamako (ML-BKO), Mali." in plain
    assert drilldown_url(GRAFANA, alert) in plain
    assert f'href="{drilldown_url(GRAFANA, alert).replace("&", "&amp;")}"' in html and "<table" in html
    (row,) = _rows(db, "channel = 'email'")
    assert (row["status"], row["response_code"], row["target"]) == ("delivered", 250, "j.martin@ofast.example.fr")
    assert "queued as test" in row["reason"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a test certificate")
def test_email_over_starttls_with_login_and_refusals_that_retrying_cannot_fix(db: Any, tmp_path: Path) -> None:
    paris = "officers:\n" + _officer("fr-paris", "{type: email, to: j.martin@ofast.example.fr}")
    with SmtpServer(tls_dir=tmp_path) as smtp:
        good = _smtp(
            smtp, starttls=True, username=smtp.username, password=smtp.password, ssl_context=smtp.client_context
        )

        async def scenario() -> list[list[Any]]:
            results = []
            for alert_id, config in (
                ("tls-ok", good),
                ("tls-bad-password", replace(good, password="wrong")),
                ("no-starttls", replace(good, starttls=False, username=None, password=None)),
            ):
                service = _service(db, paris, smtp=config)
                results.append(await service.handle(make_alert(alert_id=alert_id)))
                await service.close()
            return results

        ok, bad_password, plain = asyncio.run(scenario())
    assert [o.status for o in ok] == ["delivered"] and len(smtp.messages) == 1
    assert smtp.messages[0][2]["X-Synthwatch-Alert-Id"] == "tls-ok"
    assert (bad_password[0].status, bad_password[0].attempts) == ("gave_up", 1)
    assert "535" in bad_password[0].reason
    assert (plain[0].status, plain[0].attempts) == ("gave_up", 1)  # the server requires STARTTLS: 530
    codes = {r["alert_id"]: r["response_code"] for r in _rows(db)}
    assert codes == {"tls-ok": 250, "tls-bad-password": 535, "no-starttls": 530}


def test_a_password_is_never_configured_for_a_plain_text_smtp_connection() -> None:
    with pytest.raises(SmtpConfigError, match=r"SYNTHWATCH_SMTP_STARTTLS=true .* SYNTHWATCH_SMTP_SSL=true"):
        SmtpConfig("smtp.example.org", 25, starttls=False, username="bot", password="s3cret")
    with pytest.raises(SmtpConfigError, match="password in clear"):
        SmtpConfig.from_settings(Settings(smtp_host="smtp.example.org", smtp_starttls=False, smtp_password="s3cret"))
    relay = SmtpConfig.from_settings(Settings(smtp_host="relay.internal", smtp_starttls=False))
    assert relay is not None and relay.password is None  # no login: a plain relay stays possible
    smtps = SmtpConfig.from_settings(Settings(smtp_host="h", smtp_port=465, smtp_ssl=True, smtp_password="p"))
    assert smtps is not None and smtps.ssl and not smtps.starttls
    assert smtps.password == "p"  # the login gets it; no repr shows it (a traceback's locals, a debug print)
    settings = Settings(smtp_host="h", smtp_port=465, smtp_ssl=True, smtp_password="hunter2-smtp")
    assert "hunter2-smtp" not in repr(settings) and "hunter2-smtp" not in repr(SmtpConfig.from_settings(settings))


def test_a_server_without_starttls_never_sees_the_password(db: Any) -> None:
    """A relay offering AUTH in clear (or a man in the middle stripping STARTTLS): we stop before logging in."""
    paris = "officers:\n" + _officer("fr-paris", "{type: email, to: j.martin@ofast.example.fr}")
    with SmtpServer(plain_auth=True) as smtp:

        async def scenario() -> list[Any]:
            config = _smtp(smtp, starttls=True, username=smtp.username, password=smtp.password)
            service = _service(db, paris, smtp=config)
            outcomes = await service.handle(make_alert())
            await service.close()
            return outcomes

        (outcome,) = asyncio.run(scenario())
    assert (outcome.status, outcome.attempts) == ("gave_up", 1)
    assert "STARTTLS extension not supported" in outcome.reason and "SMTP_STARTTLS" in outcome.reason
    assert smtp.auth_attempts == 0 and smtp.messages == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a test certificate")
def test_email_over_smtps_with_login(db: Any, tmp_path: Path) -> None:
    paris = "officers:\n" + _officer("fr-paris", "{type: email, to: j.martin@ofast.example.fr}")
    with SmtpServer(tls_dir=tmp_path, implicit_tls=True) as smtp:
        config = _smtp(
            smtp,
            starttls=False,
            ssl=True,
            username=smtp.username,
            password=smtp.password,
            ssl_context=smtp.client_context,
        )

        async def scenario() -> list[Any]:
            service = _service(db, paris, smtp=config)
            outcomes = await service.handle(make_alert(alert_id="smtps-ok"))
            await service.close()
            return outcomes

        (outcome,) = asyncio.run(scenario())
    assert outcome.status == "delivered", outcome.reason
    assert smtp.auth_attempts == 1 and smtp.messages[0][2]["X-Synthwatch-Alert-Id"] == "smtps-ok"


# --- retries ------------------------------------------------------------------------------------------------


def test_a_failing_first_attempt_is_retried_after_a_backoff_and_both_attempts_are_recorded(db: Any) -> None:
    policy = replace(FAST, base_delay_s=0.3, max_delay_s=1.0)

    async def scenario() -> tuple[WebhookReceiver, list[Any]]:
        async with WebhookReceiver(statuses={"bamako": [503]}) as hooks:
            service = _service(db, subscriptions_yaml(hooks), policy=policy)
            outcomes = await service.handle(make_alert())
            await service.close()
            return hooks, outcomes

    hooks, outcomes = asyncio.run(scenario())
    first, second = hooks.on("bamako")
    assert (first.status, second.status) == (503, 200)
    assert first.key == second.key == make_alert().alert_id
    assert second.at - first.at >= 0.3
    webhook = next(o for o in outcomes if o.channel == "webhook")
    assert (webhook.status, webhook.attempts) == ("delivered", 2)
    rows = _rows(db, "channel = 'webhook'")
    assert [(r["attempt"], r["status"], r["response_code"]) for r in rows] == [
        (1, "failed", 503),
        (2, "delivered", 200),
    ]
    assert rows[0]["reason"] == "HTTP 503: scripted failure"


def test_delivery_gives_up_after_the_limit_and_at_once_when_retrying_cannot_help(db: Any) -> None:
    async def scenario() -> tuple[WebhookReceiver, dict[str, Any]]:
        async with WebhookReceiver(statuses={"down": [500] * 10, "gone": [404]}) as hooks:
            closed = f"http://127.0.0.1:{_closed_port()}/nothing"
            text = "officers:\n" + "".join(
                _officer(name, hook(url, name))
                for name, url in (("down", hooks.url("down")), ("gone", hooks.url("gone")), ("closed", closed))
            )
            service = _service(db, text)
            outcomes = await service.handle(make_alert())
            await service.close()
            return hooks, {o.officer_id: o for o in outcomes}

    hooks, outcomes = asyncio.run(scenario())
    assert len(hooks.on("down")) == 3 and len(hooks.on("gone")) == 1
    assert (outcomes["down"].status, outcomes["down"].attempts) == ("gave_up", 3)
    assert outcomes["down"].reason == "HTTP 500: scripted failure (gave up after 3 attempts)"
    assert (outcomes["gone"].status, outcomes["gone"].attempts) == ("gave_up", 1)
    assert (outcomes["closed"].status, outcomes["closed"].attempts) == ("gave_up", 3)
    down = _rows(db, "officer_id = 'down'")
    assert [(r["attempt"], r["status"], r["response_code"]) for r in down] == [
        (1, "failed", 500),
        (2, "failed", 500),
        (3, "gave_up", 500),
    ]
    assert [(r["status"], r["response_code"]) for r in _rows(db, "officer_id = 'gone'")] == [("gave_up", 404)]
    assert [r["response_code"] for r in _rows(db, "officer_id = 'closed'")] == [None, None, None]


def _closed_port() -> int:
    return free_port("127.0.0.1")  # free a moment ago and nobody listens: connection refused


def test_configuration_problems_and_stale_alerts_are_recorded_not_sent(db: Any) -> None:
    unset = "SYNTHWATCH_TEST_SECRET_NOBODY_SET"
    assert unset not in os.environ
    text = "officers:\n" + _officer("no-secret", f"{{type: webhook, url: 'http://127.0.0.1:9/x', secret_env: {unset}}}")
    stale = make_alert(alert_id="s" * 24, detected_at=datetime.now(UTC) - timedelta(days=8))

    async def scenario() -> tuple[list[Any], list[Any]]:
        service = _service(db, text)
        results = await service.handle(make_alert()), await service.handle(stale)
        await service.close()
        return results

    no_secret, too_old = asyncio.run(scenario())
    assert (no_secret[0].status, no_secret[0].attempts) == ("gave_up", 1)
    assert f"{unset} is not set" in no_secret[0].reason
    assert too_old[0].status == "gave_up" and too_old[0].reason.startswith("stale: detected 192 h ago")


# --- one message per (alert, officer, channel) --------------------------------------------------------------


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Wait in the event loop until ``condition()`` holds (the service's tasks run meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.01)


def test_a_hanging_channel_does_not_delay_other_officers_or_later_alerts(db: Any) -> None:
    """Told by order, not by the clock: the slow officer's receiver holds its request (for an hour) and the
    channel's timeout is a minute, so every step below happens while that request is still unanswered."""
    senegal = make_alert(alert_id="sn" * 12, region="SN-DK", country="SN")
    mali = make_alert(alert_id="ml" * 12)

    async def scenario() -> tuple[list[str], bool, bool]:
        async with WebhookReceiver(delay_s={"slow": 3600.0}) as hooks:
            text = "officers:\n" + _officer(
                "slow", hook(hooks.url("slow"), "slow", timeout_s=60.0), route="countries: [SN], "
            )
            text += _officer("fast", hook(hooks.url("fast"), "fast"))
            service = _service(db, text, policy=replace(FAST, max_attempts=1))
            senegal_ticket, mali_ticket = await service.submit([senegal, mali])
            await mali_ticket  # the later alert is out ...
            await _until(lambda: len(hooks.accepted("fast")) == 2, "the fast officer has both alerts")
            await _until(lambda: "slow" in hooks.arrivals, "the slow officer's request reached its receiver")
            slow_held = hooks.arrivals.count("slow") == 1 and not hooks.on("slow")  # ... and hangs there
            senegal_pending = not senegal_ticket.done()
            await service.close()
            return [r.key for r in hooks.accepted("fast")], slow_held, senegal_pending

    fast_keys, slow_held, senegal_pending = asyncio.run(scenario())
    assert sorted(fast_keys) == ["ml" * 12, "sn" * 12]
    assert slow_held and senegal_pending


def test_a_channel_that_never_answers_gives_up_on_its_timeout(db: Any) -> None:
    """The receiver holds every request for an hour, so an outcome can only come from the channel's timeout."""

    async def scenario() -> tuple[WebhookReceiver, list[Any]]:
        async with WebhookReceiver(delay_s={"slow": 3600.0}) as hooks:
            text = "officers:\n" + _officer("slow", hook(hooks.url("slow"), "slow", timeout_s=0.4))
            service = _service(db, text, policy=replace(FAST, max_attempts=2))
            outcomes = await service.handle(make_alert())
            await service.close()
            return hooks, outcomes

    hooks, outcomes = asyncio.run(scenario())
    assert [(o.officer_id, o.status, o.attempts) for o in outcomes] == [("slow", "gave_up", 2)]
    assert "no answer within 0.4 s" in outcomes[0].reason
    assert hooks.arrivals == ["slow", "slow"] and hooks.on("slow") == []  # both sent, neither answered


def test_an_endpoint_limits_attempts_and_its_breaker_opens_defers_probes_and_closes() -> None:
    async def scenario() -> list[str]:
        endpoint = Endpoint("http://hung:80", EndpointLimits(concurrency=2, failures_to_open=2, cooldown_s=0.05))
        told: list[str] = []

        async def note(why: str) -> None:
            told.append(why)

        assert [await endpoint.turn(), await endpoint.turn()] == [False, False]
        third = asyncio.ensure_future(endpoint.turn())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not third.done() and endpoint.in_flight == 2  # the limit holds
        await endpoint.done(reached=True, probe=False)
        assert await third is False
        await endpoint.done(reached=False, probe=False)
        assert endpoint.state == "closed"  # one failure in a row is not enough
        await endpoint.done(reached=False, probe=False)
        assert (endpoint.state, endpoint.in_flight, endpoint.failures) == ("open", 0, 2)

        probe = await endpoint.turn(note)  # deferred until the cool-down is over, then the one probe
        assert probe is True and endpoint.state == "half_open" and len(told) == 1
        assert "circuit open, delivery deferred" in told[0] and "2 consecutive failures" in told[0]
        waiting = asyncio.ensure_future(endpoint.turn(note))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()  # no second attempt while the probe is out
        await endpoint.done(reached=False, probe=True)
        assert endpoint.state == "open" and endpoint.cooldown_s == pytest.approx(0.1)  # failed probe: twice as long
        second_probe = await waiting
        assert second_probe is True
        follower = asyncio.ensure_future(endpoint.turn(note))
        await endpoint.done(reached=True, probe=True)
        assert await follower is False  # the probe got through: the circuit is closed and everyone goes
        assert (endpoint.state, endpoint.failures, endpoint.cooldown_s) == ("closed", 0, 0.05)
        await endpoint.done(reached=True, probe=False)
        return told

    told = asyncio.run(scenario())
    assert len(told) == 2  # each turn that found the circuit open said so once (the follower found it closed)


def test_with_one_receiver_hung_the_others_get_all_their_alerts_while_its_deliveries_wait(db: Any) -> None:
    """The functional form of the latency bar (the numbers are in `bench_delivery.bench_hung_receiver`).

    The cool-down is long and the test ends it (``probe_now``) once every alert waits: what is deferred
    does not depend on how fast this machine is (under load, a 0.2 s cool-down let probes through).
    """
    alerts = [make_alert(alert_id=f"hung{i:020d}") for i in range(12)]
    healthy = ["bko", "dkr", "rab"]
    limits = EndpointLimits(concurrency=2, failures_to_open=2, cooldown_s=30.0)
    # many attempts, short backoffs: the hung officer's deliveries must still be pending, not given up
    policy = replace(FAST, max_attempts=1000, base_delay_s=0.05, max_delay_s=0.1)

    async def scenario() -> tuple[WebhookReceiver, WebhookReceiver, list[list[Any]], dict[str, Any]]:
        # two servers: an endpoint is a server (scheme, host, port), and only one of them hangs
        async with WebhookReceiver() as hooks, WebhookReceiver(delay_s={"hung": 3600.0}) as stuck:
            text = "webhook_allowed_networks: [127.0.0.0/8]\nofficers:\n" + "".join(
                _officer(name, hook(hooks.url(name), name)) for name in healthy
            )
            text += _officer("hung", hook(stuck.url("hung"), "hung", timeout_s=0.2))
            service = _service(db, text, policy=policy, endpoint_limits=limits, max_in_flight=4)
            tickets = await service.submit(alerts)
            endpoint = service.endpoints[f"http://127.0.0.1:{stuck.port}"]
            await _until(lambda: all(len(hooks.accepted(n)) == len(alerts) for n in healthy), "healthy deliveries")
            # every one of the hung officer's alerts ends up waiting on the open circuit
            await _until(lambda: endpoint.state == "open" and endpoint.waiting == len(alerts), "all deferred")
            seen: dict[str, Any] = {"pending": [t.done() for t in tickets]}
            seen["hung_requests"] = stuck.arrivals.count("hung")
            stuck.delay_s["hung"] = 0  # the receiver recovers ...
            await endpoint.probe_now()  # ... and is probed at once: one probe, then the deferred go out
            outcomes = list(await asyncio.gather(*tickets))
            seen["waiting_after"] = endpoint.waiting
            await service.close()
            return hooks, stuck, outcomes, seen

    hooks, stuck, outcomes, seen = asyncio.run(scenario())
    assert seen["pending"] == [False] * len(alerts)  # the hung officer's deliveries were all still waiting ...
    assert all(hooks.per_key(name) == {a.alert_id: 1 for a in alerts} for name in healthy)  # ... the others had all
    assert stuck.per_key("hung") == {a.alert_id: 1 for a in alerts}  # and after recovery: every alert, once
    assert {o.status for group in outcomes for o in group} == {"delivered"}
    assert seen["waiting_after"] == 0
    rows = _rows(db, "officer_id = 'hung'")
    deferred = [r for r in rows if r["status"] == "deferred"]
    assert all("circuit open, delivery deferred" in r["reason"] for r in deferred)
    assert {r["alert_id"] for r in deferred} == {a.alert_id for a in alerts}  # each alert waited, and said so
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["reason"] == "no answer within 0.2 s" for r in failed)
    # while it hung, the open circuit kept the alerts away: the attempts that opened it (the two that
    # failed first, and at most one that took a freed slot before the second failure), not one per alert
    assert 2 <= seen["hung_requests"] <= limits.failures_to_open + 1
    assert len(failed) == seen["hung_requests"]


def test_webhooks_connect_only_to_allowed_addresses_even_through_dns() -> None:
    """``localhost`` passes no literal check; the resolver sees 127.0.0.1 and refuses it before connecting."""
    body = b'{"kind": "alert", "delivery_id": "d_1", "officer_id": "bko"}'

    async def scenario() -> tuple[WebhookReceiver, list[Any]]:
        async with WebhookReceiver() as hooks:
            results = []
            for policy, url in (
                (TargetPolicy(), hooks.url("x").replace("127.0.0.1", "localhost")),
                (TargetPolicy(), hooks.url("x")),
                (TargetPolicy.of(["127.0.0.0/8", "::1/128"]), hooks.url("x").replace("127.0.0.1", "localhost")),
            ):
                sender = WebhookSender(policy=policy)
                sent = await sender.post(
                    url, body, secret=secret_for("bko"), delivery_id="d_1", event="alert", timeout_s=5
                )
                results.append(sent)
                await sender.close()
            return hooks, results

    hooks, (by_name, by_address, allowed) = asyncio.run(scenario())
    for refused in (by_name, by_address):
        assert not refused.ok and not refused.retryable and refused.code is None
        assert "is 127.0.0.1 (loopback): refused" in refused.reason and "webhook_allowed_networks" in refused.reason
    assert allowed.ok and allowed.code == 200
    assert len(hooks.on("x")) == 1  # only the allowed request reached the receiver


@dataclass
class _HostileReceiver(WebhookReceiver):
    """A receiver that is not ours answering as it likes: a status, then a body that never ends (``/endless``,
    ``/refuses-endlessly``), or a refusal in a charset it names (``/punycode``: 300 KB of ``a``)."""

    PUNYCODE_BODY: ClassVar[bytes] = b"a" * 300_000

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        await request.read()
        if name == "punycode":
            named = {"Content-Type": "text/plain; charset=punycode"}
            return web.Response(status=503, body=self.PUNYCODE_BODY, headers=named)
        response = web.StreamResponse(status=200 if name == "endless" else 503)
        response.content_type = "text/plain"
        await response.prepare(request)
        chunk = b"x" * 1024
        with contextlib.suppress(ConnectionError):
            while True:  # until the sender hangs up
                await response.write(chunk)
                await asyncio.sleep(0.001)
        return response


def test_a_receivers_answer_is_read_only_as_far_as_its_status_and_never_decoded_in_its_own_charset() -> None:
    """The receiver is not ours. Before, the whole answer was read and decoded with the charset it named, on the
    event loop: a 2xx followed by an endless body was recorded as "no answer" after the timeout (and held a
    connection and a growing buffer until then), and ``charset=punycode`` (quadratic to decode) held the loop,
    every agent of the worker with it, for as long as the receiver liked."""
    body = b'{"kind": "alert", "delivery_id": "d_1", "officer_id": "bko"}'

    async def scenario() -> dict[str, Any]:
        async with _HostileReceiver() as hostile:
            sender = WebhookSender(policy=TargetPolicy.of(LOOPBACK))
            results = {}
            for name in ("endless", "refuses-endlessly", "punycode"):
                results[name] = await sender.post(
                    hostile.url(name), body, secret=secret_for("bko"), delivery_id="d_1", event="alert", timeout_s=3
                )
            await sender.close()
            return results

    results = asyncio.run(scenario())
    endless, refusing, punycode = results["endless"], results["refuses-endlessly"], results["punycode"]
    assert endless.ok and endless.code == 200, endless.reason  # before: "no answer within 3 s"
    assert not refusing.ok and refusing.retryable and refusing.code == 503, refusing.reason
    assert refusing.reason == "HTTP 503: " + "x" * 200  # the start of the answer, for the record
    assert not punycode.ok and punycode.code == 503
    assert punycode.reason == "HTTP 503: " + "a" * 200  # read as UTF-8, whatever charset the receiver named


async def _until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Wait (in the loop) until ``predicate()``; a guard against a hang, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_the_same_alert_again_in_a_batch_or_later_is_sent_once_and_a_409_counts_as_delivered(db: Any) -> None:
    alert = make_alert()
    already = make_alert(alert_id="r" * 24)

    async def scenario() -> tuple[WebhookReceiver, list[list[Any]], list[Any], list[Any]]:
        async with WebhookReceiver() as hooks:
            hooks.seen.add(delivery_id(already.alert_id, "bko", "webhook"))  # it got there before, our answer was lost
            service = _service(db, "officers:\n" + _officer("bko", hook(hooks.url("b"), "bko")))
            batch = await service.handle_batch([alert, alert])
            again = await service.handle(alert)
            replayed = await service.handle(already)
            await service.close()
            return hooks, batch, again, replayed

    hooks, batch, again, replayed = asyncio.run(scenario())
    assert hooks.per_key("b") == {alert.alert_id: 1}
    assert sorted(o.status for outcomes in batch for o in outcomes) == ["delivered", "skipped"]
    assert [o.status for o in again] == ["skipped"]
    assert replayed[0].status == "delivered" and "already had it" in replayed[0].reason
    assert len(_rows(db, f"alert_id = '{alert.alert_id}'")) == 1


def test_a_restarted_service_replaying_the_topic_sends_nothing_twice(db: Any) -> None:
    alerts = [make_alert(alert_id=f"{i:024d}") for i in range(6)]

    async def scenario() -> WebhookReceiver:
        async with WebhookReceiver() as hooks:
            paris_secret = secret_for("fr-paris-ofast")
            text = (
                subscriptions_yaml(hooks)
                .replace("type: email", "type: webhook, name: paris")
                .replace(
                    'to: "j.martin@ofast.example.fr"',
                    f'url: "{hooks.url("paris")}", secret: {paris_secret}',
                )
            )
            first = _service(db, text)
            await first.handle_batch(alerts[:3])  # ... and then the worker dies
            await first.close()
            second = _service(db, text)  # restarted: an empty memory, the same ClickHouse
            outcomes = await second.handle_batch(alerts)  # the topic is replayed from the start
            await second.close()
            assert [o.status for o in outcomes[0]] == ["skipped", "skipped"]
            assert [o.status for o in outcomes[5]] == ["delivered", "delivered"]
            return hooks

    hooks = asyncio.run(scenario())
    for path in ("bamako", "paris"):
        assert len(hooks.on(path)) == 6 and hooks.per_key(path) == {a.alert_id: 1 for a in alerts}
    counts = db.query(
        "SELECT officer_id, channel, alert_id, countIf(status = 'delivered') FROM deliveries "
        "GROUP BY officer_id, channel, alert_id"
    ).result_rows
    assert len(counts) == 12 and {row[3] for row in counts} == {1}


@pytest.mark.slow
def test_a_worker_killed_mid_delivery_delivers_the_rest_after_restart_and_nothing_twice(db: Any) -> None:
    """Killed while requests are in flight: the receiver may have them; the signed delivery id makes the resend
    harmless."""
    alerts = [make_alert(alert_id=f"{i:024d}") for i in range(4)]

    async def scenario() -> WebhookReceiver:
        async with WebhookReceiver(delay_s={"b": 0.3}) as hooks:
            text = "officers:\n" + _officer("bko", hook(hooks.url("b"), "bko"))
            first = _service(db, text)
            await first.handle(alerts[0])
            tickets = await first.submit(alerts[1:])
            await asyncio.sleep(0.1)  # requests are at the receiver, answers not back yet
            await first.close()  # the worker stops: deliveries cancelled, alerts never acknowledged
            assert all(t.cancelled() or t.exception() is not None for t in tickets)
            second = _service(db, text)
            outcomes = await second.handle_batch(alerts)
            await second.close()
            assert [o.status for o in outcomes[0]] == ["skipped"]
            assert all(o.status == "delivered" for outcome in outcomes[1:] for o in outcome)
            await asyncio.sleep(0.4)  # let the receiver finish the abandoned requests
            return hooks

    hooks = asyncio.run(scenario())
    assert hooks.per_key("b") == {a.alert_id: 1 for a in alerts}  # accepted once each; a resend got 409
    delivered = db.query("SELECT alert_id, count() FROM deliveries WHERE status = 'delivered' GROUP BY alert_id")
    assert sorted(delivered.result_rows) == [(a.alert_id, 1) for a in alerts]


# --- digests ------------------------------------------------------------------------------------------------

DAKAR = "officers:\n" + _officer(
    "sn-dk-sante",
    "{type: email, to: a.ndiaye@sante.example.sn}",
    language="fr",
    extra="    timezone: Africa/Dakar\n    digest_time: '07:00'\n    immediate_min_severity: critical\n",
    route="countries: [SN], ",
)


def test_alerts_below_the_threshold_wait_for_one_daily_digest_sent_once(db: Any) -> None:
    sn = {"region": "SN-DK", "country": "SN"}
    warning = make_alert(alert_id="w" * 24, severity="warning", alert_type="first_in_region", **sn)
    info = make_alert(
        alert_id="i" * 24, severity="info", substance={"name": "Ketamine", "key": "ket", "family": None}, **sn
    )
    critical = make_alert(alert_id="c" * 24, **sn)
    later = make_alert(
        alert_id="l" * 24, severity="warning", substance={"name": "3-MMC", "key": "m", "family": None}, **sn
    )
    officer = parse_subscriptions(DAKAR).officers[0]
    day1 = officer.digest_moment(datetime.now(UTC) + timedelta(days=1))

    with SmtpServer() as smtp:

        async def scenario() -> dict[str, Any]:
            service = _service(db, DAKAR, smtp=_smtp(smtp))
            got: dict[str, Any] = {"first": await service.handle_batch([warning, info, critical])}
            got["again"] = await service.handle(warning)
            got["early"] = await service.send_digests(day1 - timedelta(minutes=1))
            got["due"] = await service.send_digests(day1 + timedelta(minutes=1))
            got["same_day"] = await service.send_digests(day1 + timedelta(hours=2))
            await service.close()
            restarted = _service(db, DAKAR, smtp=_smtp(smtp))
            got["after_restart"] = await restarted.send_digests(day1 + timedelta(hours=3))
            await restarted.handle(later)
            got["later_same_day"] = await restarted.send_digests(day1 + timedelta(hours=4))
            got["next_day"] = await restarted.send_digests(day1 + timedelta(days=1, minutes=1))
            await restarted.close()
            return got

        got = asyncio.run(scenario())
    assert [[o.status for o in outcomes] for outcomes in got["first"]] == [
        ["queued_digest"],
        ["queued_digest"],
        ["delivered"],
    ]
    assert [o.status for o in got["again"]] == ["skipped"]
    assert got["early"] == [] and got["same_day"] == [] and got["after_restart"] == [] and got["later_same_day"] == []
    assert sorted((o.alert_id, o.status) for o in got["due"]) == [("i" * 24, "digest_sent"), ("w" * 24, "digest_sent")]
    assert [o.alert_id for o in got["next_day"]] == ["l" * 24]
    subjects = [m["Subject"] for _, _, m in smtp.messages]
    assert subjects[0].startswith("[synthwatch CRITIQUE] Nouvelle substance")  # critical: at once
    first, second = (format_date(d.date(), "long", locale="fr") for d in (day1, day1 + timedelta(days=1)))
    assert subjects[1:] == [
        f"[synthwatch] Résumé quotidien du {first} : 2 alertes",
        f"[synthwatch] Résumé quotidien du {second} : 1 alerte",
    ]
    digest = smtp.messages[1][2].get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert digest.index("Pentyloxynitazene") < digest.index("Ketamine")  # warning before info
    sent = _rows(db, "status = 'digest_sent'")
    assert [r["digest_id"] for r in sent[:2]] == [f"digest-sn-dk-sante-email-{day1.date()}"] * 2
    queued = _rows(db, "status = 'queued_digest'")
    assert len(queued) == 3 and Alert.model_validate_json(queued[0]["alert_json"]).alert_id in {"w" * 24, "i" * 24}


def test_a_webhook_digest_that_gives_up_is_held_then_retried(db: Any) -> None:
    async def scenario() -> tuple[WebhookReceiver, list[list[Any]]]:
        async with WebhookReceiver(statuses={"d": [500, 500]}) as hooks:
            text = DAKAR.replace("{type: email, to: a.ndiaye@sante.example.sn}", hook(hooks.url("d"), "sn-dk-sante"))
            service = _service(db, text, policy=replace(FAST, max_attempts=2, digest_hold_s=600))
            await service.handle(make_alert(severity="warning", region="SN-DK", country="SN"))
            moment = service.subscriptions.officers[0].digest_moment(datetime.now(UTC) + timedelta(days=1))
            results = [
                await service.send_digests(moment + timedelta(minutes=1)),
                await service.send_digests(moment + timedelta(minutes=2)),  # held after giving up
                await service.send_digests(moment + timedelta(minutes=12)),
            ]
            await service.close()
            return hooks, results

    hooks, (gave_up, held, retried) = asyncio.run(scenario())
    assert [o.status for o in gave_up] == ["gave_up"] and held == [] and [o.status for o in retried] == ["digest_sent"]
    (accepted,) = hooks.accepted("d")
    assert accepted.headers[EVENT_HEADER] == "digest" and accepted.key.startswith("digest-sn-dk-sante-webhook-")
    assert accepted.json()["delivery_id"] == accepted.headers[DELIVERY_HEADER] == delivery_id(accepted.key)
    assert accepted.json()["kind"] == "digest" and len(accepted.json()["alerts"]) == 1


def test_a_digest_lists_the_most_severe_alerts_up_to_its_limit_and_counts_the_rest(db: Any) -> None:
    """A junk name raises an info alert, so one lab could fill every officer's digest: the digest lists at most
    DIGEST_MAX_LISTED alerts (most severe first), says how many more it covers, and marks them all sent."""
    extra = 5
    sn = {"region": "SN-DK", "country": "SN"}
    junk = [
        make_alert(
            alert_id=f"j{i:023d}",
            severity="info",
            substance={"name": f"junk-{i}", "key": f"name:junk{i}", "family": None},
            **sn,
        )
        for i in range(DIGEST_MAX_LISTED + extra)
    ]
    warning = make_alert(alert_id="w" * 24, severity="warning", alert_type="first_in_region", **sn)

    async def scenario() -> tuple[WebhookReceiver, list[Any]]:
        async with WebhookReceiver() as hooks:
            text = DAKAR.replace("{type: email, to: a.ndiaye@sante.example.sn}", hook(hooks.url("d"), "sn-dk-sante"))
            service = _service(db, text)
            await service.handle_batch([*junk, warning])
            moment = service.subscriptions.officers[0].digest_moment(datetime.now(UTC) + timedelta(days=1))
            outcomes = await service.send_digests(moment + timedelta(minutes=1))
            await service.close()
            return hooks, outcomes

    hooks, outcomes = asyncio.run(scenario())
    assert len(outcomes) == len(junk) + 1 and {o.status for o in outcomes} == {"digest_sent"}  # all covered
    (digest,) = hooks.accepted("d")
    payload = digest.json()
    assert len(payload["alerts"]) == DIGEST_MAX_LISTED and payload["alerts_not_listed"] == extra + 1
    assert payload["alerts"][0]["alert_id"] == "w" * 24  # the most severe first
    assert payload["subject"].endswith(f": {len(junk) + 1} alertes")
    assert f"... et {extra + 1} autres alertes, non listées ici" in payload["text"]
    assert len(payload["links"]) == DIGEST_MAX_LISTED
    assert len(_rows(db, "status = 'digest_sent'")) == len(junk) + 1
    count_line = {
        "en": f"... and {extra + 1} more alerts, not listed here",
        "fr": f"... et {extra + 1} autres alertes, non listées ici",
        "ar": f"... وعدد التنبيهات الأخرى غير المدرجة هنا: {extra + 1} ",
    }
    for language, line in count_line.items():
        message = render_digest([*junk, warning], language, GRAFANA, date(2026, 3, 10), "Awa")
        assert len(message.links) == DIGEST_MAX_LISTED
        assert line in message.text and line in message.html, language
        assert "`synthwatch alerts`" in message.text, language  # plain text quotes the command
        assert "synthwatch alerts</code>" in message.html and "`" not in message.html, language  # HTML sets it as code


def test_an_edited_subscriptions_file_is_picked_up_and_a_broken_edit_ignored(db: Any, tmp_path: Path) -> None:
    path = tmp_path / "subs.yaml"
    path.write_text(DAKAR)
    service = DeliveryService.from_settings(Settings(subscriptions_file=path), db)
    assert service.reload_if_changed() is False
    path.write_text(DAKAR.replace("Sn-Dk-Sante", "Awa Ndiaye"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert service.reload_if_changed() is True and service.subscriptions.officers[0].name == "Awa Ndiaye"
    path.write_text("officers: [")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert service.reload_if_changed() is False and service.subscriptions.officers[0].name == "Awa Ndiaye"


def test_the_worker_allows_loopback_webhooks_only_when_its_settings_say_so(db: Any, tmp_path: Path) -> None:
    path = tmp_path / "subs.yaml"
    path.write_text("officers:\n" + _officer("bko", hook("http://127.0.0.1:9/x", "bko")))
    with pytest.raises(SubscriptionsError, match=r"subs.yaml:6: officers\[0\]\.routes\[0\]\.channel\.url: .*loopback"):
        DeliveryService.from_settings(Settings(subscriptions_file=path), db)
    allowed = Settings(subscriptions_file=path, webhook_allowed_networks=["127.0.0.0/8"])
    service = DeliveryService.from_settings(allowed, db)
    assert service.webhook.policy.refusal("h", "127.0.0.1") is None
    assert service.webhook.policy.refusal("h", "10.0.0.1") is not None  # only what was allowed
    with pytest.raises(ValueError, match="'intranet' is not an IP network"):
        Settings(webhook_allowed_networks=["intranet"])


def test_attach_delivery_defines_the_delivery_agent_on_the_alerts_topic(db: Any) -> None:
    app = faust.App("delivery-test", broker="kafka://127.0.0.1:1", store="memory://")
    topic = app.topic("alerts-test", key_serializer="raw", value_serializer="raw")
    agent = attach_delivery(app, topic, _service(db, DAKAR), batches=lambda s: channel_batches(s, 10))
    assert agent.name == "delivery" and "delivery" in app.agents
    assert agent.channel.get_topic_name() == "alerts-test"  # type: ignore[attr-defined]


class _FakeMessage:
    def __init__(self, offset: int, generation: int) -> None:
        self.topic, self.partition, self.offset, self.tp = "alerts", 0, offset, ("alerts", 0)
        self.generation_id, self.tracked = generation, False


class _FakeEvent:
    def __init__(self, offset: int, value: bytes, generation: int, acked: list[int]) -> None:
        self.message, self.value, self._acked = _FakeMessage(offset, generation), value, acked

    def ack(self) -> None:
        self._acked.append(self.message.offset)


class _FakeQueue(asyncio.Queue[Any]):
    """A channel queue that ends the stream (as Faust does at stop) when it meets ``None``."""

    _errors: Any = __import__("collections").deque()

    async def get(self) -> Any:
        item = await super().get()
        if item is None:
            raise StopAsyncIteration
        return item


def test_the_delivery_agent_skips_alerts_taken_while_the_flow_is_stopped_without_acknowledging_them() -> None:
    """Faust's ``noack_take`` acknowledged the events its stream loop skips (flow stopped for a seek, or a
    stale generation after a rebalance): such an alert could be committed without ever being delivered.
    The delivery agent now batches like the other agents: skipped events are neither delivered nor
    acknowledged (the seek or the new generation fetches them again); the others are delivered, then
    acknowledged. Unit level, with a fake app and channel: stopping the flow at a chosen moment is not
    something a real broker lets a test do deterministically."""
    from types import SimpleNamespace

    from synthwatch.stream_apps.delivery.service import deliver_alerts

    acked: list[int] = []
    submitted: list[str] = []
    flow = SimpleNamespace(active=True)
    flow.is_active = lambda: flow.active
    app = SimpleNamespace(
        consumer=SimpleNamespace(unacked=set()),
        consumer_generation_id=2,
        topics=SimpleNamespace(acking_topics={"alerts"}),
        flow_control=flow,
    )

    class Service:
        async def submit(self, alerts: list[Alert]) -> list[asyncio.Future[list[Any]]]:
            submitted.extend(a.alert_id for a in alerts)
            done = []
            for _ in alerts:
                future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
                future.set_result([])
                done.append(future)
            return done

    async def run() -> None:
        queue = _FakeQueue()
        stream = SimpleNamespace(app=app, channel=SimpleNamespace(queue=queue), should_stop=False)

        async def maybe_start() -> bool:
            return False

        stream.maybe_start = maybe_start

        def alert(offset: int, generation: int = 2) -> _FakeEvent:
            value = make_alert(alert_id=f"flow{offset:020d}").model_dump_json().encode()
            return _FakeEvent(offset, value, generation, acked)

        async def batches() -> Any:
            async for events in channel_batches(stream, 10):  # type: ignore[arg-type]
                yield events

        queue.put_nowait(alert(1))
        queue.put_nowait(alert(2, generation=1))  # fetched before a rebalance
        agent = asyncio.ensure_future(deliver_alerts(app, batches(), Service()))  # type: ignore[arg-type]
        for _ in range(20):
            await asyncio.sleep(0)
        flow.active = False  # a seek or a rebalance stops the flow: what is taken now is stale
        queue.put_nowait(alert(3))
        for _ in range(20):
            await asyncio.sleep(0)
        flow.active = True
        queue.put_nowait(alert(4))
        for _ in range(20):
            await asyncio.sleep(0)
        queue.put_nowait(None)
        await agent
        for _ in range(20):  # let the acknowledging tasks run
            await asyncio.sleep(0)

    asyncio.run(run())
    assert submitted == [f"flow{1:020d}", f"flow{4:020d}"]
    assert sorted(acked) == [1, 4]  # 2 and 3 stay unacknowledged: fetched again, never committed past
    assert {m.offset for m in app.consumer.unacked} == {1, 4}  # tracked, so no commit passes them before their ack


# --- command line -------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "subscriptions.example.yaml"


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A host for the delivery commands, as synthwatch.cli.main mounts them."""

    register(app)
    return app


EXAMPLE_SECRETS = {
    "SYNTHWATCH_SECRET_ML_DOUANES": "ml-douanes-0123456789abcdef",
    "SYNTHWATCH_SECRET_SN_SANTE": "sn-sante-0123456789abcdef",
    "SYNTHWATCH_SECRET_UNODC": "unodc-0123456789abcdef",
}


def test_subscriptions_check_shows_who_receives_what(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"COLUMNS": "200", **EXAMPLE_SECRETS}
    done = runner.invoke(_cli(), ["subscriptions", "check", str(EXAMPLE)], env=env)
    assert done.exit_code == 0, done.output
    assert "5 officer(s)" in done.output and "is valid" in done.output
    assert (
        "ml-bko-douanes" in done.output and "immediately" in done.output and "digest 08:00 Europe/Paris" in done.output
    )
    alert_file = tmp_path / "alert.json"
    alert_file.write_text(make_alert(region="SN-DK", country="SN", severity="warning").model_dump_json())
    mine = runner.invoke(_cli(), ["subscriptions", "check", str(EXAMPLE), "--alert", str(alert_file)], env=env)
    assert mine.exit_code == 0 and "sn-dk-sante" in mine.output and "digest 07:00 Africa/Dakar" in mine.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("officers:\n  - id: x\n    name: X\n    language: de\n    routes: []\n")
    bad = runner.invoke(_cli(), ["subscriptions", "check", str(broken)], env={"COLUMNS": "200"})
    assert bad.exit_code == 1
    assert f"{broken}:4: officers[0].language: Input should be 'en', 'fr' or 'ar'" in bad.stderr
    assert f"{broken}:5: officers[0].routes: needs at least 1 item(s)" in bad.stderr


def test_subscriptions_check_refuses_webhooks_without_an_own_secret(tmp_path: Path) -> None:
    """A secret shared by two agencies lets either sign alerts for the other: the check says so and fails."""
    runner = CliRunner()
    env = {"COLUMNS": "200", **EXAMPLE_SECRETS}
    shared_value = {**env, "SYNTHWATCH_SECRET_UNODC": EXAMPLE_SECRETS["SYNTHWATCH_SECRET_ML_DOUANES"]}
    done = runner.invoke(_cli(), ["subscriptions", "check", str(EXAMPLE)], env=shared_value)
    assert done.exit_code == 1
    assert "fr-75-unodc-liaison / channel webhook: its secret has the same value as officer ml-bko-douanes" in (
        done.stderr
    )
    assert "give each officer's webhook its own secret" in done.stderr and "is valid" not in done.output
    unset = {k: v for k, v in env.items() if k != "SYNTHWATCH_SECRET_SN_SANTE"}
    missing = runner.invoke(_cli(), ["subscriptions", "check", str(EXAMPLE)], env=unset)
    assert missing.exit_code == 1 and "SYNTHWATCH_SECRET_SN_SANTE is not set" in missing.stderr
    text = EXAMPLE.read_text()
    same_variable = tmp_path / "same-variable.yaml"
    same_variable.write_text(text.replace("SYNTHWATCH_SECRET_UNODC", "SYNTHWATCH_SECRET_ML_DOUANES"))
    bad = runner.invoke(_cli(), ["subscriptions", "check", str(same_variable)], env=env)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "SYNTHWATCH_SECRET_UNODC" in t)
    assert bad.exit_code == 1
    assert f"{same_variable}:{line}: officers[4].routes[1].channel.secret_env: officer fr-75-unodc-liaison uses " in (
        bad.stderr
    )
    no_secret = tmp_path / "no-secret.yaml"
    no_secret.write_text(text.replace("          secret_env: SYNTHWATCH_SECRET_SN_SANTE\n", ""))
    bad = runner.invoke(_cli(), ["subscriptions", "check", str(no_secret)], env=env)
    assert bad.exit_code == 1 and "officers[2].routes[0].channel: a webhook needs its own secret" in bad.stderr


def test_subscriptions_check_warns_when_other_users_can_read_literal_webhook_secrets(tmp_path: Path) -> None:
    """A literal ``secret:`` signs alerts for its officer; in a file other users can read, any of them could forge
    that officer's alerts. The keys files are refused for this; a subscriptions file gets a warning (one without
    literal secrets may be world-readable, as a Kubernetes ConfigMap is)."""
    runner = CliRunner()
    literal = tmp_path / "literal.yaml"
    literal.write_text("officers:\n" + _officer("bko", hook("https://hooks.example.org/b", "bko")))
    by_env = tmp_path / "by-env.yaml"
    by_env.write_text(EXAMPLE.read_text())
    warned = "holds webhook secrets (bko/webhook) but other users can read or change it"
    outputs = {}
    for name, path, mode in (("open", literal, 0o644), ("private", literal, 0o600), ("env", by_env, 0o644)):
        path.chmod(mode)
        done = runner.invoke(_cli(), ["subscriptions", "check", str(path)], env={"COLUMNS": "300", **EXAMPLE_SECRETS})
        outputs[name] = " ".join(done.output.split())
    assert warned in outputs["open"] and f"chmod 600 {literal}" in outputs["open"]
    assert "holds webhook secrets" not in outputs["private"] and "holds webhook secrets" not in outputs["env"]


def test_deliveries_lists_recent_attempts_of_an_officer(db: Any, ch_settings: Settings, monkeypatch: Any) -> None:
    async def scenario() -> None:
        async with WebhookReceiver(statuses={"bamako": [503]}) as hooks:
            service = _service(db, subscriptions_yaml(hooks))
            await service.handle(make_alert())
            await service.close()

    asyncio.run(scenario())
    monkeypatch.setenv("SYNTHWATCH_DATA_DIR", str(ch_settings.data_dir))
    monkeypatch.setenv("SYNTHWATCH_CLICKHOUSE_DATABASE", ch_settings.clickhouse_database)
    runner = CliRunner()
    done = runner.invoke(_cli(), ["deliveries", "--officer", "ml-bko-douanes"], env={"COLUMNS": "250"})
    assert done.exit_code == 0, done.output
    assert "delivered" in done.output and "failed" in done.output and "503" in done.output
    assert "fr-paris-ofast" not in done.output and "delivered: 1, failed: 1" in done.output
    everyone = runner.invoke(_cli(), ["deliveries", "--limit", "1"], env={"COLUMNS": "250"})
    assert everyone.exit_code == 0 and everyone.output.count("aaaaaaaaaaaaaaaaaaaaaaaa") == 1
    nobody = runner.invoke(_cli(), ["deliveries", "--officer", "nobody"], env={"COLUMNS": "250"})
    assert nobody.exit_code == 0 and "No delivery attempts recorded for nobody." in nobody.output
    wrong = runner.invoke(_cli(), ["deliveries", "--status", "lost"])
    assert wrong.exit_code == 1 and "--status is one of" in wrong.stderr


# --- the example receiver in docs/ ---------------------------------------------------------------------------

RECEIVER_EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "webhook_receiver.py"


def test_the_documented_example_receiver_accepts_real_deliveries_and_refuses_replays_and_forgeries(db: Any) -> None:
    """docs/examples/webhook_receiver.py, run as an officer would run it, against this service's deliveries."""
    import subprocess
    import sys

    officers = ("bko", "dkr")
    env = {**os.environ, **{f"SECRET_{o.upper()}": secret_for(o) for o in officers}}
    command = [sys.executable, str(RECEIVER_EXAMPLE), "--port", "0"]
    command += [a for o in officers for a in ("--secret-env", f"{o}=SECRET_{o.upper()}")]
    receiver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        url = receiver.stdout.readline().strip().removeprefix("listening on ") + "/synthwatch"
        assert url.startswith("http://127.0.0.1:"), url

        def text_for(target: str) -> str:
            return "officers:\n" + "".join(_officer(o, hook(target, o)) for o in officers)

        def forward(request: Any, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
            wire = {
                k: v for k, v in (headers or request.headers).items() if k.lower() not in ("content-length", "host")
            }
            sent = urllib.request.Request(url, data=body or request.body, headers=wire)
            try:
                with urllib.request.urlopen(sent, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return error.code

        async def scenario() -> tuple[list[Any], list[Any], WebhookReceiver]:
            service = _service(db, text_for(url))
            delivered = await service.handle(make_alert(alert_id="example-1"))
            await service.close()
            late = _service(db, text_for(url))
            late.webhook.clock = lambda: time.time() - 3600  # signed an hour ago: outside the window
            stale = await late.handle(make_alert(alert_id="example-2"))
            await late.close()
            # our record of example-1 is lost (the crash window), so it is sent again: captured on the wire
            db.command("TRUNCATE TABLE deliveries")
            async with WebhookReceiver() as capture:
                again = _service(db, text_for(capture.url("c")))
                await again.handle(make_alert(alert_id="example-1"))
                await again.close()
            return delivered, stale, capture

        delivered, stale, capture = asyncio.run(scenario())
        assert [(o.officer_id, o.status) for o in delivered] == [("bko", "delivered"), ("dkr", "delivered")]
        assert [(o.status, o.attempts) for o in stale] == [("gave_up", 1)] * 2 and "HTTP 400" in stale[0].reason
        captured = {r.json()["officer_id"]: r for r in capture.on("c")}
        assert set(captured) == set(officers)
        bko, dkr = captured["bko"], captured["dkr"]
        statuses = {
            "replayed": forward(bko),  # the same signed delivery id again
            "tampered": forward(bko, body=bko.body.replace(b"Pentyloxynitazene", b"Pentyloxynitazene, evacuate")),
            "forged": forward(
                dkr,  # bko's secret cannot sign for dkr
                headers={
                    **dkr.headers,
                    SIGNATURE_HEADER: webhook_headers(
                        secret_for("bko"), dkr.body, dkr.headers[DELIVERY_HEADER], "alert", time.time()
                    )[SIGNATURE_HEADER],
                },
            ),
            "unsigned": forward(bko, headers={"Content-Type": "application/json"}),
        }
        assert statuses == {"replayed": 409, "tampered": 401, "forged": 401, "unsigned": 401}
        # Content-Length: -1 made it read until the sender hung up (unbounded, unauthenticated): refused at once
        host, port = urlsplit(url).hostname, urlsplit(url).port
        for declared in (b"-1", b"\xb2"):  # "\xb2" is "²" in Latin-1: isdigit() but not int()
            with socket.create_connection((host, port), timeout=10) as raw:
                raw.sendall(b"POST /synthwatch HTTP/1.1\r\nHost: x\r\nContent-Length: " + declared + b"\r\n\r\n{}")
                assert raw.recv(64).startswith(b"HTTP/1.0 400 "), declared
    finally:
        receiver.terminate()
        out, err = receiver.communicate(timeout=10)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    accepted = [r for r in lines if r["status"] == 200]
    assert sorted((r["officer_id"], r["alert_id"]) for r in accepted) == [("bko", "example-1"), ("dkr", "example-1")]
    assert accepted[0]["delivery_id"] == delivery_id("example-1", accepted[0]["officer_id"], "webhook")
    assert [r["status"] for r in lines if r["status"] != 200] == [400, 400, 409, 401, 401, 401, 400, 400], (
        lines,
        err,
    )


# --- benchmark parts (the full run needs the wired worker: `bench_delivery`) ---------------------------------


def test_bench_reports_are_new_nitazenes_in_bamako_that_reach_the_french_webhook() -> None:
    resolver = SubstanceResolver()
    variants = nitazene_variants(21)
    resolved = [resolver.resolve(name, smiles) for name, smiles in variants]
    assert len({r.key for r in resolved}) == 21
    assert all(r.family == "nitazene" and not r.catalogued for r in resolved)
    event = parse_event_object(lab_report("bench-1", *variants[0]))
    assert (event.region, event.kind) == ("ML-BKO", "lab_detection")
    subscriptions = parse_subscriptions(bench_subscriptions("http://127.0.0.1:1/hook"))
    (recipient,) = recipients(make_alert(), subscriptions)
    assert (recipient.officer.language, recipient.channel.type, recipient.immediate) == ("fr", "webhook", True)
    assert recipients(make_alert(region="FR-75C", country="FR"), subscriptions) == []
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 99) == pytest.approx(1.99)


def test_bench_receiver_accepts_signed_requests_only(monkeypatch: Any) -> None:
    monkeypatch.setenv("SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS", "elsewhere:9092")
    env = stack_env(Settings(subscriptions_file=Path("/x/subs.yaml"), web_port=0), {"SECRET_X": "s" * 16})
    assert env["SYNTHWATCH_SUBSCRIPTIONS_FILE"] == "/x/subs.yaml" and "SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS" not in env
    assert env["SECRET_X"] == "s" * 16
    with LatencyReceiver(SECRET) as receiver:
        payload = {"kind": "alert", "delivery_id": "d_1", "alert_id": "a1", "alert": {"evidence_event_ids": ["e1"]}}
        body = json.dumps({**payload, "language": "fr"}).encode()
        signed = urllib.request.Request(
            receiver.url, data=body, headers=webhook_headers(SECRET, body, "d_1", "alert", time.time()), method="POST"
        )
        with urllib.request.urlopen(signed, timeout=5) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(receiver.url, data=body, method="POST"), timeout=5)
        assert refused.value.code == 401
        got = receiver.wait_for(lambda p: "e1" in p["alert"]["evidence_event_ids"], timeout=2)
        assert got is not None and got[1]["language"] == "fr"
        assert receiver.wait_for(lambda p: False, timeout=0.05) is None


# --- the Faust agent on a real broker ------------------------------------------------------------------------


class _KillableDelivery:
    """A delivery-only worker the test can SIGKILL and start again, on its own alerts topic, with the alerts
    it will publish: the worker is ``tests.support.delivery_helpers`` run as a child process."""

    def __init__(self, broker: Any, tmp_path: Path, name: str, alerts: int) -> None:
        import uuid

        from kafka import KafkaProducer

        from synthwatch.stack.broker import ensure_topics

        suffix = uuid.uuid4().hex[:6]
        self.tmp_path, self.bootstrap = tmp_path, broker.bootstrap_servers
        self.settings = Settings(
            data_dir=tmp_path / "worker", topic_alerts=f"alerts-{name}-{suffix}", app_id=f"{name}-{suffix}"
        )
        ensure_topics(self.settings, self.bootstrap)
        self.alerts = [make_alert(alert_id=f"{suffix}{i:018d}") for i in range(alerts)]
        self.producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")

    def publish(self, batch: list[Alert], keyed: bool) -> None:
        """Keyed by alert id (spread over partitions), or all on partition 0 in this order."""
        for alert in batch:
            value = alert.model_dump_json().encode()
            if keyed:
                self.producer.send(self.settings.topic_alerts, key=alert.alert_id.encode(), value=value)
            else:
                self.producer.send(self.settings.topic_alerts, value=value, partition=0)
        self.producer.flush()

    def wait_committed(self, what: str) -> None:
        """Until the group has committed every alert published so far (it acknowledges only final ones)."""
        from synthwatch.stack.broker import consumer_lag
        from tests.conftest import wait_until

        topics = [self.settings.topic_alerts]
        wait_until(lambda: consumer_lag(self.bootstrap, self.settings.app_id, topics) == 0, 60, what)

    def start(self) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / "worker.log", "ab")  # noqa: SIM115 - the child writes to it for its whole life
        command = [sys.executable, "-m", "tests.support.delivery_helpers", str(self.settings.data_dir), self.bootstrap]
        command += [self.settings.topic_alerts, str(self.tmp_path / "subs.yaml"), self.settings.app_id]
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=log)
        log.close()
        return process


@pytest.mark.integration
@pytest.mark.slow
def test_the_agent_acknowledges_alerts_only_when_final_so_a_killed_worker_loses_none(
    broker: Any, tmp_path: Path
) -> None:
    """Delivered before the kill: not sent again. Still retrying at the kill: delivered after the restart."""
    import signal

    from tests.conftest import wait_until
    from tests.support.delivery_helpers import ThreadedReceiver

    worker = _KillableDelivery(broker, tmp_path, "delivery", alerts=6)
    alerts, start = worker.alerts, worker.start

    def publish(batch: list[Alert]) -> None:
        worker.publish(batch, keyed=True)

    with ThreadedReceiver() as hooks:
        (tmp_path / "subs.yaml").write_text(
            "webhook_allowed_networks: [127.0.0.0/8]\nofficers:\n"
            + _officer("bko", hook(hooks.url, "bko"), language="fr")
        )
        first = start()
        try:
            publish(alerts[:3])
            wait_until(lambda: set(hooks.accepted()) >= {a.alert_id for a in alerts[:3]}, 90, "the first deliveries")
            worker.wait_committed("the offsets of the final deliveries committed")
            hooks.override = 503  # the officer's system goes down ...
            publish(alerts[3:])
            retrying = {a.alert_id for a in alerts[3:]}
            wait_until(
                lambda: retrying <= {k for k, s in hooks.snapshot() if s == 503}, 60, "attempts during the outage"
            )
            time.sleep(1.5)  # still retrying after several commit intervals: an early ack would be committed by now
        finally:
            first.send_signal(signal.SIGKILL)  # ... and the worker dies while it retries
            first.wait(10)
        seen_before_restart = len(hooks.snapshot())
        hooks.override = None
        second = start()
        try:
            wait_until(lambda: set(hooks.accepted()) >= retrying, 90, "the deliveries left over by the killed worker")
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    worker.producer.close()
    assert hooks.accepted() == {a.alert_id: 1 for a in alerts}
    resent = {key for key, _ in hooks.snapshot()[seen_before_restart:]}
    assert resent <= retrying  # nothing delivered before the kill was sent again


@pytest.mark.integration
@pytest.mark.slow
def test_an_alert_still_retrying_is_not_committed_past_by_the_quick_ones_after_it(broker: Any, tmp_path: Path) -> None:
    """Faust commits past one unacknowledged offset at the head of the acknowledged ones (faust-streaming
    issue 606): the alert at offset C still retrying, C+1 and C+2 delivered, it committed C+3, and a worker
    killed then never delivered C. The commit now waits for C."""
    import signal

    from tests.conftest import wait_until
    from tests.support.delivery_helpers import ThreadedReceiver

    worker = _KillableDelivery(broker, tmp_path, "head", alerts=5)
    alerts, start = worker.alerts, worker.start

    def publish(batch: list[Alert]) -> None:
        worker.publish(batch, keyed=False)  # one partition: offsets in this order

    with ThreadedReceiver() as hooks:
        (tmp_path / "subs.yaml").write_text(
            "webhook_allowed_networks: [127.0.0.0/8]\nofficers:\n" + _officer("bko", hook(hooks.url, "bko"))
        )
        first = start()
        slow = alerts[2].alert_id
        try:
            publish(alerts[:2])
            wait_until(lambda: set(hooks.accepted()) >= {a.alert_id for a in alerts[:2]}, 90, "the first deliveries")
            worker.wait_committed("their offsets committed")
            hooks.refuse.add(slow)  # this one alert's delivery keeps failing; the two after it go through
            publish(alerts[2:])
            wait_until(
                lambda: set(hooks.accepted()) >= {a.alert_id for a in alerts[3:]} and (slow, 503) in hooks.snapshot(),
                60,
                "the later alerts delivered while the slow one retries",
            )
            time.sleep(1.5)  # several commit intervals: a commit past the slow alert would be made by now
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        hooks.refuse.clear()
        second = start()
        try:
            wait_until(lambda: slow in hooks.accepted(), 60, "the slow alert delivered after the restart")
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    worker.producer.close()
    assert hooks.accepted() == {a.alert_id: 1 for a in alerts}  # and nothing twice


def test_concurrent_submits_of_one_alert_waiting_for_a_slot_send_it_once(db: Any) -> None:
    alert = make_alert()

    async def scenario() -> WebhookReceiver:
        async with WebhookReceiver(delay_s={"b": 0.2}) as hooks:
            text = "officers:\n" + _officer("bko", hook(hooks.url("b"), "bko"))
            service = _service(db, text, max_in_flight=1)
            busy = await service.submit([make_alert(alert_id="z" * 24)])  # holds the only slot for 0.2 s
            both = await asyncio.gather(service.handle(alert), service.handle(alert))
            await asyncio.gather(*busy)
            await service.close()
            assert sorted(o.status for outcomes in both for o in outcomes) == ["delivered", "skipped"]
            return hooks

    assert asyncio.run(scenario()).per_key("b") == {"z" * 24: 1, alert.alert_id: 1}


def test_a_delivery_that_gave_up_is_resent_by_hand_with_the_same_signed_delivery_id(
    db: Any, ch_settings: Settings, monkeypatch: Any, tmp_path: Path
) -> None:
    """`deliveries resend ID` against a real receiver: new signed attempts, same delivery id, numbered after."""
    runner, alert = CliRunner(), make_alert()

    async def scenario() -> dict[str, Any]:
        async with WebhookReceiver(statuses={"bamako": [503, 503, 503]}) as hooks:
            text = subscriptions_yaml(hooks)
            service = _service(db, text)
            first = {o.officer_id: o.status for o in await service.handle(alert)}
            await service.close()
            file = tmp_path / "subscriptions.yaml"
            file.write_text(text)
            monkeypatch.setenv("SYNTHWATCH_SUBSCRIPTIONS_FILE", str(file))
            wide = {"COLUMNS": "250"}
            listing = await asyncio.to_thread(runner.invoke, _cli(), ["deliveries", "--status", "gave_up"], env=wide)
            found = re.search(
                r"ml-bko-douanes/webhook; send it again with `synthwatch deliveries resend (d_\w+)`", listing.output
            )
            assert found, listing.output
            resent = await asyncio.to_thread(runner.invoke, _cli(), ["deliveries", "resend", found.group(1)], env=wide)
            again = await asyncio.to_thread(runner.invoke, _cli(), ["deliveries", "resend", found.group(1)], env=wide)
            mail_id = delivery_id(alert.alert_id, "fr-paris-ofast", "email")
            mail = await asyncio.to_thread(runner.invoke, _cli(), ["deliveries", "resend", mail_id], env=wide)
            bogus = await asyncio.to_thread(runner.invoke, _cli(), ["deliveries", "resend", "d_" + "0" * 32], env=wide)
            return {
                "first": first,
                "id": found.group(1),
                "resent": resent,
                "again": again,
                "mail": mail,
                "bogus": bogus,
                "requests": list(hooks.requests),
            }

    monkeypatch.setenv("SYNTHWATCH_DATA_DIR", str(ch_settings.data_dir))
    monkeypatch.setenv("SYNTHWATCH_CLICKHOUSE_DATABASE", ch_settings.clickhouse_database)
    got = asyncio.run(scenario())
    assert got["first"] == {"ml-bko-douanes": "gave_up", "fr-paris-ofast": "gave_up"}
    signed_id = delivery_id(alert.alert_id, "ml-bko-douanes", "webhook")
    assert got["id"] == signed_id
    assert got["resent"].exit_code == 0, got["resent"].output + got["resent"].stderr
    assert f"delivery {signed_id}: delivered after 1 new attempt" in got["resent"].output
    *failed, accepted = got["requests"]
    assert [r.status for r in failed] == [503, 503, 503] and accepted.status == 200  # verified by the receiver
    assert accepted.headers[DELIVERY_HEADER] == accepted.json()["delivery_id"] == signed_id
    assert accepted.json()["alert_id"] == alert.alert_id and accepted.json()["language"] == "fr"
    first_timestamp = failed[0].headers[SIGNATURE_HEADER].split(",")[0]
    assert accepted.headers[SIGNATURE_HEADER].split(",")[0] >= first_timestamp  # signed afresh
    rows = _rows(db, "officer_id = 'ml-bko-douanes'")
    assert [(r["attempt"], r["status"]) for r in rows] == [
        (1, "failed"),
        (2, "failed"),
        (3, "gave_up"),
        (4, "delivered"),
    ]
    assert got["again"].exit_code == 1 and "was delivered since" in got["again"].stderr
    # No SMTP server here: the e-mail is refused again (not retried), its attempt numbered after the first one.
    assert got["mail"].exit_code == 1 and "gave_up after 1 new attempt: no SMTP" in got["mail"].output
    assert "no SMTP server configured" in got["mail"].output
    mails = _rows(db, "officer_id = 'fr-paris-ofast'")
    assert [(r["attempt"], r["status"]) for r in mails] == [(1, "gave_up"), (2, "gave_up")]
    assert got["bogus"].exit_code == 1 and "--status gave_up" in got["bogus"].stderr


@pytest.mark.integration
@pytest.mark.slow
def test_resend_goes_through_the_running_worker_that_holds_the_embedded_engine(broker: Any, tmp_path: Path) -> None:
    """With `synthwatch worker` holding the embedded engine, `deliveries resend` asks it (token-protected
    `/deliveries/resend`); the worker's own service sends the alert to a real receiver and records it."""
    from kafka import KafkaProducer

    from synthwatch.stackfile import read_web_token
    from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner, worker_key
    from tests.conftest import isolated_settings, run_cli, start_worker, stop_worker, wait_until
    from tests.support.delivery_helpers import ThreadedReceiver

    alert = make_alert(alert_id="r" * 24)
    with ThreadedReceiver() as hooks:
        subs = tmp_path / "subs.yaml"
        subs.write_text(
            "webhook_allowed_networks: [127.0.0.0/8]\nofficers:\n" + _officer("bko", hook(hooks.url, "bko"))
        )
        settings = isolated_settings(broker, tmp_path / "worker", subscriptions_file=subs)
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            hooks.override = 400  # the receiver refuses: a final answer, the delivery gives up at once
            producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
            try:
                topic, key, value = settings.topic_alerts, alert.alert_id.encode(), alert.model_dump_json().encode()
                signer = WorkerSigner(worker_key(None, settings.data_dir))
                producer.send(topic, key=key, value=value, headers=signer.headers(topic, key, value)).get(30)
            finally:
                producer.close()
            gave_up = "SELECT count() FROM deliveries WHERE alert_id = {a:String} AND status = 'gave_up'"
            wait_until(lambda: worker.count(gave_up, {"a": alert.alert_id}) == 1, 60, "the delivery to give up")
            hooks.override = None  # fixed
            wanted = delivery_id(alert.alert_id, "bko", "webhook")
            request = urllib.request.Request(
                f"{worker.info.web_url}/deliveries/resend",
                data=json.dumps({"delivery_id": wanted}).encode(),
                headers={"Content-Type": "application/json", "Authorization": "Bearer wrong"},
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 401 and hooks.accepted() == {}
            assert read_web_token(settings)
            done = run_cli(settings, "deliveries", "resend", wanted)
            assert done.returncode == 0, done.stdout + done.stderr + worker.describe()
            assert f"delivery {wanted}: delivered after 1 new attempt" in done.stdout
            assert hooks.accepted() == {alert.alert_id: 1}
            rows = worker.query(
                "SELECT attempt, toString(status) FROM deliveries WHERE alert_id = {a:String} ORDER BY at, attempt",
                {"a": alert.alert_id},
            ).rows
            assert [tuple(r) for r in rows] == [(1, "gave_up"), (2, "delivered")]
        finally:
            stop_worker(worker)
