"""Alert delivery on real parts: an aiohttp webhook receiver and an aiosmtpd server started by each test on
free loopback ports, and the embedded ClickHouse (``ch``) holding the ``deliveries`` table.

What an officer would notice is what is checked: content and language, signatures, one message per
(alert, officer, channel) across a restart or a replay, retries that end in a delivery or a recorded give-up,
and that a hanging channel delays nobody else.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, get_args
from urllib.parse import parse_qs, urlsplit

import faust
import pytest
import typer
from typer.testing import CliRunner

from synthwatch.bench_delivery import (
    LatencyReceiver,
    bench_subscriptions,
    lab_report,
    nitazene_variants,
    percentile,
    stack_env,
)
from synthwatch.catalogue import Family
from synthwatch.cli_delivery import register
from synthwatch.clickhouse import migrate
from synthwatch.schemas import Alert, parse_event_object
from synthwatch.settings import Settings
from synthwatch.stream_apps.channels import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SmtpConfig,
    WebhookRejected,
    message_id,
    sign,
    verify_webhook,
    webhook_headers,
)
from synthwatch.stream_apps.delivery import DeliveryService, DeliveryStore, RetryPolicy, attach_delivery
from synthwatch.stream_apps.identity import SubstanceResolver
from synthwatch.stream_apps.messages import (
    FAMILIES,
    LANGUAGES,
    TEMPLATE_DIR,
    drilldown_url,
    number,
    render_alert,
    render_digest,
)
from synthwatch.stream_apps.subscriptions import Subscriptions, parse_subscriptions, recipients

from .delivery_helpers import SECRET, SmtpServer, WebhookReceiver, make_alert, subscriptions_yaml

FAST = RetryPolicy(max_attempts=3, base_delay_s=0.05, max_delay_s=0.2, jitter=0.0)
GRAFANA = "https://grafana.example.org"


@pytest.fixture
def db(ch: Any) -> Any:
    migrate(ch)
    return ch


def _service(db: Any, subscriptions: Subscriptions | str, **options: Any) -> DeliveryService:
    if isinstance(subscriptions, str):
        subscriptions = parse_subscriptions(subscriptions)
    options = {"webhook_secret": SECRET, "policy": FAST, "grafana_url": GRAFANA, "store_retries": 3, **options}
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
    assert "14 reports in 1 day(s) against 2.5 expected (5.6 times the usual level)" in en.text
    assert "14 signalements en 1 jour(s) contre 2,5 attendus (5,6 fois le niveau habituel)" in fr.text
    assert "synthetic cathinone (under international control)" in en.text and "Why it matters: Synthetic" in en.text
    assert "cathinone de synthèse (sous contrôle international)" in fr.text and "Pourquoi c'est important" in fr.text
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
    assert "sur l'ensemble du réseau : ML-BKO, SN-DK" in text and "Signalée dans 3 régions" in text
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
    assert "Reported late: the report occurred 362 h (15.1 days) before the newest report" in en.text
    assert "Reported late</th>" in en.html and "362 h (15.1 days)" in en.html
    assert "Signalement tardif : le signalement date de 362 h (15,1 jours)" in fr.text
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
    assert message.subject == "[synthwatch] Résumé quotidien du 2026-03-10 : 2 alerte(s)"
    assert message.text.index("Pentyloxynitazene") < message.text.index("Ketamine")
    assert message.text.startswith("Bonjour Awa Ndiaye") and len(message.links) == 2


# --- webhook signatures ------------------------------------------------------------------------------------


def test_verify_webhook_accepts_a_signed_request_once_and_refuses_tampering_and_replays() -> None:
    body = b'{"alert_id": "x"}'
    now = 1_770_000_000.0
    headers = webhook_headers(SECRET, body, "alert-1", "alert", now)
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", headers[SIGNATURE_HEADER])
    seen: set[str] = set()
    lower = {k.lower(): v for k, v in headers.items()}  # header names are case-insensitive
    assert verify_webhook(SECRET, lower, body, now + 10, seen_ids=seen) == "alert-1"

    def refused(secret: str, h: dict[str, str], b: bytes, at: float) -> int:
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(secret, h, b, at, seen_ids=seen)
        return caught.value.status

    assert refused(SECRET, headers, body, now) == 409  # replayed idempotency key
    fresh = webhook_headers(SECRET, body, "alert-2", "alert", now)
    assert refused(SECRET, fresh, body + b" ", now) == 401  # body changed
    assert refused("another-secret", fresh, body, now) == 401
    assert refused(SECRET, {**fresh, TIMESTAMP_HEADER: str(int(now) + 1)}, body, now) == 401  # timestamp is signed
    assert refused(SECRET, fresh, body, now + 301) == 400  # captured and replayed later
    assert refused(SECRET, fresh, body, now - 301) == 400
    assert refused(SECRET, {"Idempotency-Key": "alert-2"}, body, now) == 401
    assert verify_webhook(SECRET, fresh, body, now, seen_ids=seen) == "alert-2"
    # one endpoint serving two officers: the same alert id for another officer is not a replay
    for officer in ("ml-bko-douanes", "ml-bko-police"):
        own = json.dumps({"officer_id": officer, "alert_id": "alert-3"}).encode()
        assert verify_webhook(SECRET, webhook_headers(SECRET, own, "alert-3", "alert", now), own, now, seen_ids=seen)
    again = json.dumps({"officer_id": "ml-bko-police", "alert_id": "alert-3"}).encode()
    assert refused(SECRET, webhook_headers(SECRET, again, "alert-3", "alert", now), again, now) == 409


# --- channels against real servers --------------------------------------------------------------------------


def test_webhook_is_signed_in_the_officers_language_with_the_alert_id_as_idempotency_key(db: Any) -> None:
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
    assert headers["Idempotency-Key"] == alert.alert_id and headers["X-Synthwatch-Event"] == "alert"
    assert abs(int(headers[TIMESTAMP_HEADER]) - started) < 5
    assert headers[SIGNATURE_HEADER] == sign(SECRET, headers[TIMESTAMP_HEADER], request.body)
    payload = request.json()
    assert (payload["officer_id"], payload["route"], payload["language"]) == ("ml-bko-douanes", "opioides-mali", "fr")
    assert payload["subject"] == "[synthwatch CRITIQUE] Nouvelle substance : Pentyloxynitazene – Bamako, Mali"
    assert "Jamais signalée sur le réseau auparavant : 1 signalement(s) observé(s), 0 attendu." in payload["text"]
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
    assert "How unusual: Never reported anywhere in the network before: 1 report(s) observed, 0 expected." in plain
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
                ("no-starttls", replace(good, starttls=False, username=None)),
                ("no-starttls-login", replace(good, starttls=False)),
            ):
                service = _service(db, paris, smtp=config)
                results.append(await service.handle(make_alert(alert_id=alert_id)))
                await service.close()
            return results

        ok, bad_password, plain, plain_login = asyncio.run(scenario())
    assert [o.status for o in ok] == ["delivered"] and len(smtp.messages) == 1
    assert smtp.messages[0][2]["X-Synthwatch-Alert-Id"] == "tls-ok"
    assert (bad_password[0].status, bad_password[0].attempts) == ("gave_up", 1)
    assert "535" in bad_password[0].reason
    assert (plain[0].status, plain[0].attempts) == ("gave_up", 1)  # the server requires STARTTLS: 530
    assert (plain_login[0].status, plain_login[0].attempts) == ("gave_up", 1)
    assert "AUTH extension not supported" in plain_login[0].reason and "SMTP_STARTTLS" in plain_login[0].reason
    codes = {r["alert_id"]: r["response_code"] for r in _rows(db)}
    assert codes == {"tls-ok": 250, "tls-bad-password": 535, "no-starttls": 530, "no-starttls-login": None}


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
                _officer(name, f"{{type: webhook, url: '{url}'}}")
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
    from synthwatch.broker import free_port

    return free_port("127.0.0.1")  # free a moment ago and nobody listens: connection refused


def test_configuration_problems_and_stale_alerts_are_recorded_not_sent(db: Any) -> None:
    text = "officers:\n" + _officer("no-secret", "{type: webhook, url: 'http://127.0.0.1:9/x'}")
    stale = make_alert(alert_id="s" * 24, detected_at=datetime.now(UTC) - timedelta(days=8))

    async def scenario() -> tuple[list[Any], list[Any]]:
        service = _service(db, text, webhook_secret=None)
        results = await service.handle(make_alert()), await service.handle(stale)
        await service.close()
        return results

    no_secret, too_old = asyncio.run(scenario())
    assert no_secret[0].status == "gave_up" and "no webhook secret" in no_secret[0].reason
    assert too_old[0].status == "gave_up" and too_old[0].reason.startswith("stale: detected 192 h ago")


# --- one message per (alert, officer, channel) --------------------------------------------------------------


@pytest.mark.slow
def test_a_hanging_channel_does_not_delay_other_officers_or_later_alerts(db: Any) -> None:
    senegal = make_alert(alert_id="sn" * 12, region="SN-DK", country="SN")
    mali = make_alert(alert_id="ml" * 12)

    async def scenario() -> tuple[WebhookReceiver, float, dict[str, float], bool, list[Any]]:
        async with WebhookReceiver(delay_s={"slow": 2.0}) as hooks:
            text = "officers:\n" + _officer(
                "slow", f"{{type: webhook, url: '{hooks.url('slow')}', timeout_s: 0.4}}", route="countries: [SN], "
            )
            text += _officer("fast", f"{{type: webhook, url: '{hooks.url('fast')}'}}")
            service = _service(db, text, policy=replace(FAST, max_attempts=2))
            started = time.monotonic()
            slow_ticket, fast_ticket = await service.submit([senegal, mali])
            await fast_ticket
            fast_done = time.monotonic() - started
            slow_still_running = not slow_ticket.done()
            slow_outcomes = await slow_ticket
            took = {"fast": fast_done, "all": time.monotonic() - started}
            await service.close()
            return hooks, started, took, slow_still_running, slow_outcomes

    hooks, started, took, slow_still_running, slow_outcomes = asyncio.run(scenario())
    # the fast officer has both alerts while the slow one is still waiting out its first timeout
    assert slow_still_running and took["fast"] < 0.4
    assert all(r.at - started < 0.4 for r in hooks.accepted("fast")) and len(hooks.accepted("fast")) == 2
    by_officer = {o.officer_id: o for o in slow_outcomes}
    assert by_officer["slow"].status == "gave_up" and "no answer within 0.4 s" in by_officer["slow"].reason
    assert by_officer["fast"].status == "delivered"
    assert took["all"] < 2.0  # two 0.4 s attempts and a backoff, not two of the receiver's 2 s hangs


def test_the_same_alert_again_in_a_batch_or_later_is_sent_once_and_a_409_counts_as_delivered(db: Any) -> None:
    alert = make_alert()
    already = make_alert(alert_id="r" * 24)

    async def scenario() -> tuple[WebhookReceiver, list[list[Any]], list[Any], list[Any]]:
        async with WebhookReceiver() as hooks:
            hooks.seen.add(f"bko/{already.alert_id}")  # the receiver got it before, say our answer was lost
            service = _service(db, "officers:\n" + _officer("bko", f"{{type: webhook, url: '{hooks.url('b')}'}}"))
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
            text = (
                subscriptions_yaml(hooks)
                .replace("type: email", "type: webhook, name: paris")
                .replace('to: "j.martin@ofast.example.fr"', f'url: "{hooks.url("paris")}"')
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
    """Killed while requests are in flight: the receiver may have them; Idempotency-Key makes the resend harmless."""
    alerts = [make_alert(alert_id=f"{i:024d}") for i in range(4)]

    async def scenario() -> WebhookReceiver:
        async with WebhookReceiver(delay_s={"b": 0.3}) as hooks:
            text = "officers:\n" + _officer("bko", f"{{type: webhook, url: '{hooks.url('b')}'}}")
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
    assert subjects[1:] == [
        f"[synthwatch] Résumé quotidien du {day1.date()} : 2 alerte(s)",
        f"[synthwatch] Résumé quotidien du {(day1 + timedelta(days=1)).date()} : 1 alerte(s)",
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
            text = DAKAR.replace(
                "{type: email, to: a.ndiaye@sante.example.sn}", f"{{type: webhook, url: '{hooks.url('d')}'}}"
            )
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
    assert accepted.headers["X-Synthwatch-Event"] == "digest" and accepted.key.startswith("digest-sn-dk-sante-webhook-")
    assert accepted.json()["kind"] == "digest" and len(accepted.json()["alerts"]) == 1


def test_an_edited_subscriptions_file_is_picked_up_and_a_broken_edit_ignored(db: Any, tmp_path: Path) -> None:
    path = tmp_path / "subs.yaml"
    path.write_text(DAKAR)
    service = DeliveryService.from_settings(Settings(subscriptions_file=path, webhook_secret=SECRET), db)
    assert service.reload_if_changed() is False
    path.write_text(DAKAR.replace("Sn-Dk-Sante", "Awa Ndiaye"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert service.reload_if_changed() is True and service.subscriptions.officers[0].name == "Awa Ndiaye"
    path.write_text("officers: [")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert service.reload_if_changed() is False and service.subscriptions.officers[0].name == "Awa Ndiaye"


def test_attach_delivery_defines_the_delivery_agent_on_the_alerts_topic(db: Any) -> None:
    app = faust.App("delivery-test", broker="kafka://127.0.0.1:1", store="memory://")
    topic = app.topic("alerts-test", key_serializer="raw", value_serializer="raw")
    agent = attach_delivery(app, topic, _service(db, DAKAR), batch=10, within=0.1)
    assert agent.name == "delivery" and "delivery" in app.agents
    assert agent.channel.get_topic_name() == "alerts-test"  # type: ignore[attr-defined]


# --- command line -------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "subscriptions.example.yaml"


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A host for the delivery commands, as synthwatch.cli mounts them."""

    register(app)
    return app


def test_subscriptions_check_shows_who_receives_what(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(_cli(), ["subscriptions", "check", str(EXAMPLE)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "5 officer(s)" in done.output and "is valid" in done.output
    assert (
        "ml-bko-douanes" in done.output and "immediately" in done.output and "digest 08:00 Europe/Paris" in done.output
    )
    alert_file = tmp_path / "alert.json"
    alert_file.write_text(make_alert(region="SN-DK", country="SN", severity="warning").model_dump_json())
    mine = runner.invoke(
        _cli(), ["subscriptions", "check", str(EXAMPLE), "--alert", str(alert_file)], env={"COLUMNS": "200"}
    )
    assert mine.exit_code == 0 and "sn-dk-sante" in mine.output and "digest 07:00 Africa/Dakar" in mine.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("officers:\n  - id: x\n    name: X\n    language: de\n    routes: []\n")
    bad = runner.invoke(_cli(), ["subscriptions", "check", str(broken)], env={"COLUMNS": "200"})
    assert bad.exit_code == 1
    assert f"{broken}:4: officers[0].language: Input should be 'en' or 'fr'" in bad.stderr
    assert f"{broken}:5: officers[0].routes: needs at least 1 item(s)" in bad.stderr


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
    env = stack_env(Settings(subscriptions_file=Path("/x/subs.yaml"), webhook_secret="s", web_port=0))
    assert env["SYNTHWATCH_SUBSCRIPTIONS_FILE"] == "/x/subs.yaml" and "SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS" not in env
    with LatencyReceiver(SECRET) as receiver:
        body = json.dumps({"alert": {"evidence_event_ids": ["e1"]}, "language": "fr"}).encode()
        signed = urllib.request.Request(
            receiver.url, data=body, headers=webhook_headers(SECRET, body, "k1", "alert", time.time()), method="POST"
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


@pytest.mark.integration
@pytest.mark.slow
def test_the_agent_acknowledges_alerts_only_when_final_so_a_killed_worker_loses_none(
    broker: Any, tmp_path: Path
) -> None:
    """Delivered before the kill: not sent again. Still retrying at the kill: delivered after the restart."""
    import signal
    import subprocess
    import sys
    import uuid

    from kafka import KafkaProducer

    from synthwatch.broker import ensure_topics

    from .conftest import wait_until
    from .delivery_helpers import ThreadedReceiver

    suffix = uuid.uuid4().hex[:6]
    settings = Settings(data_dir=tmp_path / "worker", topic_alerts=f"alerts-delivery-{suffix}", app_id=f"dlv-{suffix}")
    ensure_topics(settings, broker.bootstrap_servers)
    alerts = [make_alert(alert_id=f"{suffix}{i:018d}") for i in range(6)]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")

    def publish(batch: list[Alert]) -> None:
        for alert in batch:
            producer.send(settings.topic_alerts, key=alert.alert_id.encode(), value=alert.model_dump_json().encode())
        producer.flush()

    def start() -> subprocess.Popen[bytes]:
        log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - the child writes to it for its whole life
        command = [sys.executable, "-m", "tests.delivery_helpers", str(settings.data_dir), broker.bootstrap_servers]
        command += [settings.topic_alerts, str(tmp_path / "subs.yaml"), settings.app_id]
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=log)
        log.close()
        return process

    with ThreadedReceiver() as hooks:
        (tmp_path / "subs.yaml").write_text(
            "officers:\n" + _officer("bko", f"{{type: webhook, url: '{hooks.url}'}}", language="fr")
        )
        first = start()
        try:
            publish(alerts[:3])
            wait_until(lambda: set(hooks.accepted()) >= {a.alert_id for a in alerts[:3]}, 90, "the first deliveries")
            time.sleep(1.5)  # offsets of final deliveries get committed (commit interval 0.5 s)
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
    producer.close()
    assert hooks.accepted() == {a.alert_id: 1 for a in alerts}
    resent = {key for key, _ in hooks.snapshot()[seen_before_restart:]}
    assert resent <= retrying  # nothing delivered before the kill was sent again


def test_concurrent_submits_of_one_alert_waiting_for_a_slot_send_it_once(db: Any) -> None:
    alert = make_alert()

    async def scenario() -> WebhookReceiver:
        async with WebhookReceiver(delay_s={"b": 0.2}) as hooks:
            text = "officers:\n" + _officer("bko", f"{{type: webhook, url: '{hooks.url('b')}'}}")
            service = _service(db, text, max_in_flight=1)
            busy = await service.submit([make_alert(alert_id="z" * 24)])  # holds the only slot for 0.2 s
            both = await asyncio.gather(service.handle(alert), service.handle(alert))
            await asyncio.gather(*busy)
            await service.close()
            assert sorted(o.status for outcomes in both for o in outcomes) == ["delivered", "skipped"]
            return hooks

    assert asyncio.run(scenario()).per_key("b") == {"z" * 24: 1, alert.alert_id: 1}
