"""The immediate budget on real parts: a webhook receiver and an SMTP server on loopback ports, and the embedded
ClickHouse holding ``deliveries``.

One signed lab sending invented structures raises a critical new-substance alert per report; an officer gets at
most the budget (``SYNTHWATCH_DELIVERY_IMMEDIATE_BUDGET``, default 10) of them at once a day from that lab, the
rest in the daily digest, and one notice per reporter and day saying so. Nothing is dropped.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import Alert, parse_event_object
from synthwatch.schemas.envelope import Organisation, load_org_keys
from synthwatch.settings import Settings
from synthwatch.stream_apps.delivery.email import SmtpConfig
from synthwatch.stream_apps.delivery.messages import LANGUAGES, render_budget_notice, render_digest
from synthwatch.stream_apps.delivery.service import (
    BUDGETED_TYPES,
    DeliveryService,
    RetryPolicy,
    budget_notice_id,
    budget_units,
)
from synthwatch.stream_apps.delivery.subscriptions import parse_subscriptions
from synthwatch.stream_apps.detect.backtest import run_lines
from synthwatch.stream_apps.detect.corrections import ReportFacts, correction_notice
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.deliveries import DeliveryStore
from tests.support.delivery_helpers import LOOPBACK, SmtpServer, WebhookReceiver, cited, make_alert, subscriptions_yaml
from tests.support.factories import lab

FAST = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.05, jitter=0.0)
BUDGET = Settings().delivery_immediate_budget  # what an operator gets without setting anything
FLOODER, HONEST = "LAB-ML-FLOOD", "LNS-ML-BKO"
HOSTILE = "<script>x</script>\nFrom: evil@x \u202eLAB"
BAMAKO = "ml-bko-douanes"  # French, webhook (subscriptions_yaml)
PARIS = "fr-paris-ofast"  # English, e-mail
# The worker's clock and the alerts' detection: noon in Bamako and Paris, so every alert of a test is on one officer's
# day whenever the test runs (alerts made one by one at the wall clock straddle midnight if run then).
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.fixture
def db(ch: Any) -> Any:
    migrate(ch)
    return ch


def _service(
    db: Any,
    hooks: WebhookReceiver,
    smtp: SmtpServer,
    subscriptions: str = "",
    budget: int = BUDGET,
    organisations: Collection[Organisation] = (),
    now: datetime = NOW,
) -> DeliveryService:
    config = SmtpConfig("127.0.0.1", smtp.port, starttls=False, sender="alerts@synthwatch.example")
    return DeliveryService(
        parse_subscriptions(subscriptions or subscriptions_yaml(hooks), allowed_networks=LOOPBACK),
        DeliveryStore(db),
        immediate_budget=budget,
        organisations=organisations,
        policy=FAST,
        store_retries=3,
        allowed_networks=LOOPBACK,
        smtp=config,
        clock=lambda: now,
    )


async def _send_bamako_digest(service: DeliveryService) -> list[Any]:
    """Send the digests due a minute after Bamako's digest moment of the day after ``NOW``."""
    officer = service.subscriptions.officer(BAMAKO)
    assert officer is not None
    return await service.send_digests(officer.digest_moment(NOW + timedelta(days=1)) + timedelta(minutes=1))


def _flood(n: int, reporters: list[str], start: int = 0, **changes: Any) -> list[Alert]:
    """``n`` critical new-nitazene alerts (distinct structures) reported by ``reporters``, detected at ``NOW``."""
    changes.setdefault("detected_at", NOW)
    return [
        make_alert(alert_id=f"{(reporters or ['nobody'])[0][:6]}{i:018d}", reported_by=reporters, **changes)
        for i in range(start, start + n)
    ]


def _statuses(outcomes: list[list[Any]], officer: str) -> list[str]:
    return [o.status for alert in outcomes for o in alert if o.officer_id == officer and o.alert_id[:7] != "budget-"]


def _alerts_on_hook(hooks: WebhookReceiver) -> list[str]:
    return [r.json()["alert_id"] for r in hooks.accepted("bamako") if r.json()["kind"] == "alert"]


def _notices_on_hook(hooks: WebhookReceiver) -> list[dict[str, Any]]:
    return [r.json() for r in hooks.accepted("bamako") if r.json()["kind"] == "notice"]


def _alert_mails(smtp: SmtpServer) -> list[str]:
    return [str(m["X-Synthwatch-Alert-Id"]) for _, _, m in smtp.messages if m["X-Synthwatch-Alert-Id"]]


def _notice_mails(smtp: SmtpServer) -> list[Any]:
    return [m for _, _, m in smtp.messages if m["X-Synthwatch-Notice-Id"]]


def test_a_flooding_reporter_gets_the_budget_at_once_then_the_digest_and_one_notice(db: Any) -> None:
    alerts = _flood(BUDGET + 3, [FLOODER])
    later = _flood(2, [FLOODER], start=BUDGET + 3)

    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]], list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                first = await service.handle_batch(alerts)
                second = await service.handle_batch(later)  # later the same day: still over, no second notice
                await service.close()
                return hooks, first, second

        hooks, first, second = asyncio.run(scenario())
    ids = [a.alert_id for a in alerts]
    for officer in (BAMAKO, PARIS):
        assert _statuses(first, officer) == ["delivered"] * BUDGET + ["queued_digest"] * 3
        assert _statuses(second, officer) == ["queued_digest"] * 2
    assert _alerts_on_hook(hooks) == ids[:BUDGET] and sorted(_alert_mails(smtp)) == sorted(ids[:BUDGET])

    (notice,) = _notices_on_hook(hooks)  # one, in the officer's language (French), naming the reporter
    assert notice["reporter"] == FLOODER and notice["immediate_sent"] == BUDGET and notice["language"] == "fr"
    assert FLOODER in notice["subject"] and "résumé quotidien" in notice["text"]
    assert f"{BUDGET} alertes" in notice["text"]
    (mail,) = _notice_mails(smtp)  # the English officer's, by e-mail
    body = mail.get_body(("plain",)).get_content()
    assert FLOODER in mail["Subject"] and f"{BUDGET} alerts at once" in body and "daily digest" in body

    # Nothing dropped: the held alerts are queued for the digest with the reason, and carry the alert.
    held = db.query(
        "SELECT alert_id, officer_id, reason, alert_json FROM deliveries WHERE status = 'queued_digest' "
        "ORDER BY officer_id, alert_id"
    ).result_rows
    assert len(held) == 2 * 5
    assert {r[0] for r in held} == set(ids[BUDGET:]) | {a.alert_id for a in later}
    assert all(r[2].startswith("over the immediate budget") and FLOODER in r[2] for r in held)
    assert all(Alert.model_validate_json(r[3]).alert_id == r[0] for r in held)


def test_held_alerts_go_out_in_the_next_daily_digest(db: Any) -> None:
    alerts = _flood(BUDGET + 2, [FLOODER])
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[Any]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch(alerts)
                sent = await _send_bamako_digest(service)
                await service.close()
                return hooks, sent

        hooks, sent = asyncio.run(scenario())
    digested = sorted({o.alert_id for o in sent if o.status == "digest_sent"})
    assert digested == sorted(a.alert_id for a in alerts[BUDGET:])
    (digest,) = [r.json() for r in hooks.accepted("bamako") if r.json()["kind"] == "digest"]
    assert sorted(a["alert_id"] for a in digest["alerts"]) == digested
    # Not below the officer's threshold, and the digest says so rather than that they were
    assert digest["alerts_over_budget"] == 2 and "2 n'étaient pas sous votre seuil" in digest["text"]


def test_the_count_survives_a_restart_and_a_replay_counts_nothing_twice(db: Any) -> None:
    alerts = _flood(BUDGET + 2, [FLOODER])
    first_part = BUDGET - 2

    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                first = _service(db, hooks, smtp)
                await first.handle_batch(alerts[:first_part])
                await first.close()  # the worker restarts: an empty memory, the same ClickHouse
                second = _service(db, hooks, smtp)
                replayed = await second.handle_batch(alerts)  # the topic replayed from the start
                again = await second.handle_batch(alerts)  # and once more: still one notice
                await second.close()
                third = _service(db, hooks, smtp)  # a third start: the notice is not sent again
                await third.handle_batch(alerts)
                await third.close()
                return hooks, replayed + again

        hooks, outcomes = asyncio.run(scenario())
    replayed = outcomes[: len(alerts)]
    assert _statuses(replayed, BAMAKO) == ["skipped"] * first_part + ["delivered"] * 2 + ["queued_digest"] * 2
    assert _alerts_on_hook(hooks) == [a.alert_id for a in alerts[:BUDGET]]  # each once, BUDGET in all
    assert len(_notices_on_hook(hooks)) == 1 and len(_notice_mails(smtp)) == 1
    assert _notices_on_hook(hooks)[0]["immediate_sent"] == BUDGET


def test_two_workers_taking_turns_share_one_count_and_one_notice(db: Any) -> None:
    """Workers sharing the alerts topic read each other's stored attempts at every batch (docs: exact when their
    decisions do not race; up to N x the budget when they do)."""
    alerts = _flood(BUDGET + 2, [FLOODER])
    third = len(alerts) // 3
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                one, two = _service(db, hooks, smtp), _service(db, hooks, smtp)
                got = await one.handle_batch(alerts[:third])
                got += await two.handle_batch(alerts[third : 2 * third])
                got += await one.handle_batch(alerts[2 * third :])
                got += await two.handle_batch(_flood(1, [FLOODER], start=99))
                await one.close()
                await two.close()
                return hooks, got

        hooks, got = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["delivered"] * BUDGET + ["queued_digest"] * 3
    assert len(_notices_on_hook(hooks)) == 1 and len(_notice_mails(smtp)) == 1


def test_a_notice_cut_off_by_a_crash_is_sent_after_the_replay_once(db: Any) -> None:
    """The worker dies while the receiver holds its requests, the notice's too, unanswered; the receiver then takes
    them. The replay sends them again: answered 409 (already received), each is delivered, the notice once. A budget
    of 2 keeps every request within the endpoint's concurrency, so all of them are at the receiver when it dies."""
    budget = 2
    alerts = _flood(budget + 1, [FLOODER])
    sent = budget + 1  # two alerts and the notice
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]]]:
            answer = asyncio.Event()
            async with WebhookReceiver(gates={"bamako": answer}) as hooks:
                first = _service(db, hooks, smtp, budget=budget)
                tickets = await first.submit(alerts)
                await hooks.until("bamako", sent)  # every request, the notice's too, is at the receiver, unanswered
                await first.close()  # the worker dies: nothing acknowledged
                assert all(t.cancelled() or t.exception() is not None for t in tickets)
                answer.set()  # the receiver takes what had arrived
                await hooks.until("bamako", sent, answered=sent)
                assert sum(r.json()["kind"] == "notice" for r in hooks.accepted("bamako")) == 1
                second = _service(db, hooks, smtp, budget=budget)
                got = await second.handle_batch(alerts)  # the topic replayed
                await second.close()
                return hooks, got

        hooks, got = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["delivered"] * budget + ["skipped"]  # held back before: queued for the digest
    resent = hooks.on("bamako")[sent:]
    assert len(resent) == sent and {r.status for r in resent} == {409}  # the replay's: already received
    notices = _notices_on_hook(hooks)  # accepted once
    assert len(notices) == 1 and notices[0]["immediate_sent"] == budget
    (delivered,) = db.query(
        "SELECT count() FROM deliveries WHERE alert_type = 'budget_notice' AND officer_id = %(o)s "
        "AND status = 'delivered'",
        parameters={"o": BAMAKO},
    ).result_rows[0]
    assert delivered == 1


def test_other_reporters_and_shared_alerts_are_not_held_by_a_flooding_one(db: Any) -> None:
    flood = _flood(BUDGET + 1, [FLOODER])
    honest = _flood(2, [HONEST])
    shared = _flood(1, [FLOODER, HONEST], start=100)  # the same substance reported by both: the honest one counts
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch(flood)
                got = await service.handle_batch([*honest, *shared])
                await service.close()
                return hooks, got

        hooks, got = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["delivered"] * 3 and _statuses(got, PARIS) == ["delivered"] * 3
    assert [n["reporter"] for n in _notices_on_hook(hooks)] == [FLOODER]


def test_a_new_day_starts_a_new_budget_counted_on_the_day_of_detection(db: Any) -> None:
    today = _flood(BUDGET + 1, [FLOODER])
    # reported with yesterday's dates but detected tomorrow: the report's dates are the reporter's to choose
    tomorrow = _flood(
        1,
        [FLOODER],
        start=50,
        detected_at=NOW + timedelta(days=1),
        triggered_at=NOW - timedelta(days=1),
    )
    backdated = _flood(1, [FLOODER], start=60, triggered_at=NOW - timedelta(days=3))
    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch(today)
                got = await service.handle_batch([*tomorrow, *backdated])
                await service.close()
                return got

        got = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["delivered", "queued_digest"]


def test_without_reporters_or_with_the_budget_off_nothing_is_held(db: Any) -> None:
    unattributed = _flood(BUDGET + 1, [])  # make_alert's default: reported by nobody
    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                got = await service.handle_batch(unattributed)
                service.immediate_budget = 0
                got += await service.handle_batch(_flood(BUDGET + 1, [FLOODER]))
                await service.close()
                return got

        got = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["delivered"] * (2 * BUDGET + 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_default_budget_is_far_above_an_honest_reporters_day(seed: int) -> None:
    """The simulated network (40 days, the detection backtest): once past its first week, when every report is a
    first sighting, no reporter raises more than half the default budget of counted alerts in a day (the day the
    report came in: a live worker detects it then)."""
    lines = simulate(SimulationConfig(days=40, seed=seed, start=date(2026, 1, 1))).lines
    run = run_lines((f"sim:{i}", line) for i, line in enumerate(lines))
    per_day = Counter(
        (reporter, alert.triggered_at.date())
        for alert in run.alerts
        if alert.alert_type in BUDGETED_TYPES
        for reporter in alert.reported_by
    )
    warm = {key: n for key, n in per_day.items() if key[1] >= date(2026, 1, 8)}
    print(f"seed {seed}: most per reporter and day {max(per_day.values())}, after the first week {max(warm.values())}")
    assert warm and max(warm.values()) <= BUDGET // 2


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_notice_names_the_reporter_and_the_count_with_hostile_text_escaped(language: str) -> None:
    day = datetime(2026, 12, 7, tzinfo=UTC).date()
    message = render_budget_notice("budget-2026-12-07-abc", HOSTILE, day, BUDGET, BUDGET, language)
    assert "<script>" not in message.html and "&lt;script&gt;" in message.html
    assert "\nFrom: evil" not in message.text and "\\nFrom: evil" in message.text
    assert "\u202e" not in message.text + message.html + message.subject and "\n" not in message.subject
    for text in (message.text, message.html):
        assert "budget-2026-12-07-abc" in text and str(BUDGET) in text
    assert {"en": "7 December 2026", "fr": "7 décembre 2026", "ar": "2026"}[language] in message.text


def test_a_hostile_reporter_reaches_the_reason_and_the_email_notice_escaped(db: Any) -> None:
    alerts = _flood(BUDGET + 1, [HOSTILE])
    with SmtpServer() as smtp:

        async def scenario() -> None:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch(alerts)
                await service.close()

        asyncio.run(scenario())
    (mail,) = _notice_mails(smtp)
    assert "\n" not in str(mail["Subject"]) and "From: evil" not in str(mail["From"])
    html = mail.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;" in html
    (reason,) = db.query("SELECT DISTINCT reason FROM deliveries WHERE status = 'queued_digest'").result_rows[0]
    assert "\n" not in reason and "\u202e" not in reason


def test_the_worker_takes_the_budget_from_its_settings(db: Any, tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("SYNTHWATCH_DELIVERY_IMMEDIATE_BUDGET", "3")
    subscriptions = tmp_path / "subscriptions.yaml"
    subscriptions.write_text(subscriptions_yaml(), encoding="utf-8")
    subscriptions.chmod(0o600)
    settings = Settings(subscriptions_file=subscriptions, webhook_allowed_networks=list(LOOPBACK))
    assert DeliveryService.from_settings(settings, db).immediate_budget == 3


def _correction(alert: Alert, n: int, detected_at: datetime | None = None) -> Alert:
    """The notice that the flooding lab corrected the report behind ``alert`` (a critical correction notice), raised
    at ``detected_at`` (default: when ``alert`` was)."""
    old = ReportFacts(f"F-{n}", "lab_detection", f"lab:{FLOODER}", "isotonitazene")
    new = parse_event_object(
        lab(event_id=f"F-{n}-fix", corrects=f"F-{n}", lab_id=FLOODER, substance={"name": "protonitazene"})
    )
    return correction_notice(cited(alert), old, new, "protonitazene", detected_at or alert.detected_at)


def test_a_digest_of_corrections_that_followed_held_alerts_does_not_call_them_below_the_threshold(db: Any) -> None:
    """The alerts the budget held went out in yesterday's digest; their corrections follow them to today's, which holds
    nothing else: no notice went out for them (not counted as held back), but they were not below the officer's
    threshold either, and the digest's first sentence must not say they were."""
    alerts = _flood(BUDGET + 3, [FLOODER], detected_at=NOW - timedelta(days=1))
    fixes = [_correction(alert, n, NOW) for n, alert in enumerate(alerts)][BUDGET:]  # those of the held alerts
    with SmtpServer() as smtp:

        async def scenario() -> WebhookReceiver:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch(alerts)
                officer = service.subscriptions.officer(BAMAKO)
                assert officer is not None
                await service.send_digests(officer.digest_moment(NOW) + timedelta(minutes=1))
                await service.handle_batch(fixes)
                await _send_bamako_digest(service)
                await service.close()
                return hooks

        hooks = asyncio.run(scenario())
    first, second = [r.json() for r in hooks.accepted("bamako") if r.json()["kind"] == "digest"]
    assert first["alerts_over_budget"] == 3 and len(first["alerts"]) == 3
    assert [a["alert_type"] for a in second["alerts"]] == ["correction"] * 3 and second["alerts_over_budget"] == 0
    assert "3 alertes ont été réservées pour ce résumé" in second["text"]
    assert "sous votre seuil" not in second["text"]


def test_corrections_of_held_alerts_follow_them_to_the_digest_and_of_sent_ones_go_at_once(db: Any) -> None:
    """A flooding lab corrects each of its reports: the officer hears at once of the alerts they got at once;
    the corrections of the alerts the budget held back go to the digest with them, not one by one at once."""
    alerts = _flood(BUDGET + 3, [FLOODER])
    fixes = [_correction(alert, n) for n, alert in enumerate(alerts)]
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch(alerts)
                got = await service.handle_batch(fixes)
                await _send_bamako_digest(service)
                await service.close()
                return hooks, got

        hooks, got = asyncio.run(scenario())
    for officer in (BAMAKO, PARIS):
        assert _statuses(got, officer) == ["delivered"] * BUDGET + ["queued_digest"] * 3
    # The digest lists the 3 held alerts and their 3 corrections, and says the budget held back 3, not 6: no notice
    # was sent for a correction
    (digest,) = [r.json() for r in hooks.accepted("bamako") if r.json()["kind"] == "digest"]
    assert len(digest["alerts"]) == 6 and digest["alerts_over_budget"] == 3
    assert "6 alertes ont été réservées pour ce résumé" in digest["text"]
    at_once = [r.json()["alert"] for r in hooks.accepted("bamako") if r.json()["kind"] == "alert"]
    assert len([a for a in at_once if a["alert_type"] == "correction"]) == BUDGET
    reasons = db.query(
        "SELECT DISTINCT reason FROM deliveries WHERE alert_type = 'correction' AND status = 'queued_digest'"
    ).result_rows
    assert [r[0] for r in reasons] == [
        "over the immediate budget (the corrected alert was held back by it): queued for the daily digest"
    ]


def test_a_correction_weeks_after_its_held_alert_still_follows_it_to_the_digest(db: Any) -> None:
    """The held alert was detected (and queued) 40 days before its correction, two months' partitions back: the
    correction reads back from the alert's detection, not from the last days, and goes to the digest with it."""
    weeks_ago = NOW - timedelta(days=40)
    alerts = _flood(BUDGET + 1, [FLOODER], detected_at=weeks_ago)
    fixes = [_correction(alerts[0], 0, NOW), _correction(alerts[-1], 1, NOW)]  # of one sent at once, of the held one
    assert fixes[1].details["corrected_detected_at"] == weeks_ago.isoformat()
    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                then = _service(db, hooks, smtp, now=weeks_ago)
                await then.handle_batch(alerts)
                await then.close()
                today = _service(db, hooks, smtp)
                got = await today.handle_batch(fixes)
                await today.close()
                return got

        got = asyncio.run(scenario())
    for officer in (BAMAKO, PARIS):
        assert _statuses(got, officer) == ["delivered", "queued_digest"]


def test_a_correction_carrying_a_detection_ahead_of_this_workers_clock_still_follows_its_held_alert(db: Any) -> None:
    """The detection a notice carries is the detecting worker's clock; ahead of the delivering one's by more than the
    margin (10 days here), the bound alone passed the held alert's queueing: its correction went out at once."""
    alerts = _flood(BUDGET + 1, [FLOODER])
    fix = _correction(alerts[-1], 1)
    ahead = (NOW + timedelta(days=10)).isoformat()
    fix = fix.model_copy(update={"details": {**fix.details, "corrected_detected_at": ahead}})
    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch(alerts)
                got = await service.handle_batch([fix])
                await service.close()
                return got

        got = asyncio.run(scenario())
    for officer in (BAMAKO, PARIS):
        assert _statuses(got, officer) == ["queued_digest"]


def test_finding_held_alerts_reads_from_their_detection_and_no_older_months(db: Any) -> None:
    """The read is bounded by the corrected alerts' detection (monthly partitions by `at`): a row a month before it
    cannot be their queueing. A correction not carrying the detection (raised before it did) reads every month."""
    from synthwatch.stream_apps.delivery.service import OVER_BUDGET, _detected_since
    from synthwatch.stream_apps.storage.tables import Attempt

    store = DeliveryStore(db)
    detected = datetime(2026, 10, 31, 23, 0, tzinfo=UTC)

    def queued(alert_id: str, at: datetime) -> Attempt:
        return Attempt(
            alert_id, BAMAKO, "hook", "webhook", "r", 0, "queued_digest", f"{OVER_BUDGET} (10 ...)", None, "t", at,
            0.0, alert_type="new_substance", reported_by=[FLOODER],
        )  # fmt: skip

    # queued by a worker whose clock is an hour behind the detecting one's, and a row a month before the detection
    store.record([queued("H-1", detected - timedelta(hours=1)), queued("H-0", detected - timedelta(days=31))])
    assert store.held_back(["H-1", "H-0"], OVER_BUDGET, detected) == {("H-1", BAMAKO, "hook")}
    assert store.held_back(["H-1", "H-0"], OVER_BUDGET, None) == {("H-1", BAMAKO, "hook"), ("H-0", BAMAKO, "hook")}
    (alert,) = _flood(1, [FLOODER], detected_at=detected)
    fix = _correction(alert, 0)
    older = fix.model_copy(update={"details": {k: v for k, v in fix.details.items() if k != "corrected_detected_at"}})
    assert _detected_since([fix], NOW) == detected and _detected_since([fix, older], NOW) is None


def test_the_budget_day_is_the_officers_local_day(db: Any) -> None:
    """23:30 UTC is still the same day in Bamako (UTC) but the next one in Paris (UTC+1): the Parisian officer's
    budget starts again, the Bamako officer's does not."""
    parisian = "    language: en\n    timezone: Europe/Paris\n"
    today = _flood(BUDGET, [FLOODER])
    late = _flood(1, [FLOODER], start=70, detected_at=NOW.replace(hour=23, minute=30))
    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                file = subscriptions_yaml(hooks).replace("    language: en\n", parisian)
                assert "Europe/Paris" in file
                service = _service(db, hooks, smtp, file)
                await service.handle_batch(today)
                got = await service.handle_batch(late)
                await service.close()
                return got

        got = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["queued_digest"] and _statuses(got, PARIS) == ["delivered"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_held_correction_in_a_digest_says_what_changed_escaped(language: str) -> None:
    """A correction held back with its alert is listed in the digest with which report corrected which and what
    changed (not an empty "how unusual"), the reporter's text escaped."""
    (alert,) = _flood(1, [FLOODER])
    fix = _correction(alert, 7)
    fix = fix.model_copy(update={"details": {**fix.details, "old_substance": HOSTILE}})
    message = render_digest([fix, alert], language, "https://grafana.example", NOW.date(), "N", held=2)
    facts = f"{alert.alert_id}: F-7 → F-7-fix; "
    assert facts in message.text and facts in message.html and "→ protonitazene" in message.text
    assert "<script>" not in message.html and "\nFrom: evil" not in message.text and "\u202e" not in message.text
    unusual = {"en": "How unusual", "fr": "Caractère inhabituel", "ar": "مدى الخروج عن المعتاد"}[language]
    assert message.text.count(unusual) == 1  # the new substance's line only


def test_the_stored_count_reads_back_an_officer_14_hours_ahead_of_utc_and_no_older_months(db: Any) -> None:
    """The read is bounded by the attempt time (monthly partitions): an attempt comes after its alert's detection, on
    or after the officer's local budget day began, at most 14 h (UTC+14) before that day's UTC midnight."""
    from synthwatch.stream_apps.storage.tables import Attempt

    store = DeliveryStore(db)
    day = date(2026, 12, 1)

    def attempt(alert_id: str, at: datetime) -> Attempt:
        return Attempt(
            alert_id, "ki-officer", "hook", "webhook", "r", 1, "delivered", "", 200, "t", at, 1.0,
            alert_type="new_substance", reported_by=[FLOODER], budget_day=day,
        )  # fmt: skip

    kiribati_midnight = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)  # 2026-12-01 00:00 at UTC+14
    store.record([attempt("K-1", kiribati_midnight), attempt("K-0", datetime(2026, 10, 30, tzinfo=UTC))])
    found = store.immediate_alerts([("ki-officer", FLOODER, day)], BUDGETED_TYPES)
    assert found == {("ki-officer", FLOODER, day): {"K-1"}}  # a row a month before its day cannot be an attempt of it


def test_a_replay_of_alerts_detected_days_ago_is_held_to_one_budget(db: Any) -> None:
    """After an outage of days the topic is replayed: alerts detected three days ago (within the stale limit) still
    count on their day, across batches. Forgetting days older than two had given each batch a whole budget again."""
    three_days_ago = NOW - timedelta(days=3)
    first = _flood(BUDGET - 2, [FLOODER], detected_at=three_days_ago)
    second = _flood(BUDGET - 2, [FLOODER], start=BUDGET - 2, detected_at=three_days_ago)

    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                outcomes = await service.handle_batch(first) + await service.handle_batch(second)
                await service.close()
                return outcomes

        outcomes = asyncio.run(scenario())
    for officer in (BAMAKO, PARIS):
        assert _statuses(outcomes, officer) == ["delivered"] * BUDGET + ["queued_digest"] * (BUDGET - 4)


# --- per organisation -------------------------------------------------------------------------------------------------

LIMS = ("LAB-ML-1", "LAB-ML-2", "LAB-ML-3")  # one organisation's lab ids (one key, a buggy LIMS)


def _keys_file(tmp_path: Any, lims: tuple[str, ...] = LIMS, name: str = "keys.yaml") -> list[Organisation]:
    """The organisations of a real keys file: ``lims-ml`` reporting as ``lims``, ``lns-bko`` as the honest lab."""
    path = tmp_path / name
    path.write_text(
        "organisations:\n"
        f"  lims-ml:\n    keys: ['{'11' * 32}']\n    lab_ids: [{', '.join(lims)}]\n"
        f"  lns-bko:\n    keys: ['{'22' * 32}']\n    lab_ids: [{HONEST}]\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return list(load_org_keys(path).values())


def _lims_flood(per_lab: int, lims: tuple[str, ...] = LIMS, start: int = 0) -> list[Alert]:
    """``per_lab`` alerts from each of ``lims``, interleaved (distinct ids: one hundred apart per lab)."""
    each = [_flood(per_lab, [lab_id], start=start + 100 * n) for n, lab_id in enumerate(lims)]
    return [alert for row in zip(*each, strict=True) for alert in row]


def test_an_organisation_reporting_as_many_lab_ids_gets_one_budget(db: Any, tmp_path: Any) -> None:
    """One key that may report for three lab ids floods 30 alerts: the officer gets 10 at once in all, not 10 per lab
    id (30), and one notice naming the organisation. A lab of another organisation and a lab no organisation claims
    keep their own budgets."""
    orgs = _keys_file(tmp_path)
    flood = _lims_flood(BUDGET)
    others = [*_flood(2, [HONEST]), *_flood(2, ["LAB-UNCLAIMED"])]
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]], list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp, organisations=orgs)
                got = await service.handle_batch(flood)
                rest = await service.handle_batch(others)
                await service.close()
                return hooks, got, rest

        hooks, got, rest = asyncio.run(scenario())
    for officer in (BAMAKO, PARIS):
        assert _statuses(got, officer) == ["delivered"] * BUDGET + ["queued_digest"] * (2 * BUDGET)
        assert _statuses(rest, officer) == ["delivered"] * 4
    assert _alerts_on_hook(hooks)[:BUDGET] == [a.alert_id for a in flood[:BUDGET]]
    (notice,) = _notices_on_hook(hooks)
    assert notice["reporter"] == notice["organisation"] == "lims-ml" and notice["immediate_sent"] == BUDGET
    assert "lims-ml (organisation)" in notice["subject"] and "lims-ml (organisation)" in notice["text"]
    (mail,) = _notice_mails(smtp)
    assert "lims-ml (organisation)" in str(mail["Subject"])
    reasons = db.query("SELECT DISTINCT reason FROM deliveries WHERE status = 'queued_digest'").result_rows
    assert [r[0] for r in reasons] == [
        f"over the immediate budget ({BUDGET} first-sighting alerts a day per reporter; organisation lims-ml on "
        f"{NOW.date().isoformat()}): queued for the daily digest"
    ]


def test_an_organisations_count_is_read_back_from_its_lab_ids_after_a_restart_and_a_keys_change(
    db: Any, tmp_path: Any
) -> None:
    """The store keeps lab ids; a restarted worker counts them per organisation by its keys file. A lab id the keys file
    gives the organisation only after the restart brings its earlier alerts of the day along: no fresh budget."""
    before = _keys_file(tmp_path, LIMS[:2])  # LAB-ML-3 claimed by nobody yet: its own budget
    after = _keys_file(tmp_path, LIMS, name="keys-after.yaml")
    first = [*_flood(3, [LIMS[0]]), *_flood(3, [LIMS[2]], start=200)]
    second = _flood(BUDGET, [LIMS[1]], start=100)
    with SmtpServer() as smtp:

        async def scenario() -> tuple[list[list[Any]], list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                one = _service(db, hooks, smtp, organisations=before)
                got = await one.handle_batch(first)
                await one.close()  # the worker restarts with LAB-ML-3 added to lims-ml
                two = _service(db, hooks, smtp, organisations=after)
                rest = await two.handle_batch(second)
                await two.close()
                return got, rest

        got, rest = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["delivered"] * 6
    assert _statuses(rest, BAMAKO) == ["delivered"] * (BUDGET - 6) + ["queued_digest"] * 6


def test_a_name_claimed_by_two_organisations_is_neither_ones_budget(db: Any, tmp_path: Any) -> None:
    """The keys file refuses a lab id under two organisations, but one's lab id may be spelt like another's agency:
    alerts name it bare, so it is no organisation's (charged to both, one's flood through it would use up the
    other's budget): it keeps its own, as before organisations counted."""
    path = tmp_path / "keys.yaml"
    path.write_text(
        "organisations:\n"
        f"  lims-ml:\n    keys: ['{'11' * 32}']\n    lab_ids: [{LIMS[0]}, SHARED]\n"
        f"  douane-ml:\n    keys: ['{'22' * 32}']\n    agencies: [SHARED, Douanes maliennes]\n",
        encoding="utf-8",
    )
    path.chmod(0o600)
    orgs = list(load_org_keys(path).values())
    org_of, names_of = budget_units(orgs)
    assert "SHARED" not in org_of and org_of[LIMS[0]] == "lims-ml" and org_of["Douanes maliennes"] == "douane-ml"
    assert names_of == {"lims-ml": frozenset({LIMS[0]}), "douane-ml": frozenset({"Douanes maliennes"})}
    shared = _flood(BUDGET + 1, ["SHARED"])
    own = [*_flood(1, [LIMS[0]], start=100), *_flood(1, ["Douanes maliennes"], start=100)]
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp, organisations=orgs)
                got = await service.handle_batch(shared)
                got += await service.handle_batch(own)
                await service.close()
                return hooks, got

        hooks, got = asyncio.run(scenario())
    assert _statuses(got, BAMAKO) == ["delivered"] * BUDGET + ["queued_digest"] + ["delivered"] * 2
    (notice,) = _notices_on_hook(hooks)
    assert notice["reporter"] == "SHARED" and notice["organisation"] is None


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_notice_names_an_organisation_as_one_with_hostile_text_escaped(language: str) -> None:
    day = datetime(2026, 12, 7, tzinfo=UTC).date()
    message = render_budget_notice("budget-2026-12-07-abc", HOSTILE, day, BUDGET, BUDGET, language, organisation=True)
    assert "<script>" not in message.html and "&lt;script&gt;" in message.html
    assert "\nFrom: evil" not in message.text and "\u202e" not in message.text + message.html + message.subject
    named = {"en": "(organisation)", "fr": "(organisation)", "ar": "(منظمة)"}[language]
    for text in (message.text, message.html, message.subject):
        assert named in text


def test_the_worker_counts_per_the_organisations_its_intake_verifies_with(
    db: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """The worker's delivery agent takes the organisations from the intake's verifier (one view of the keys file)."""
    import threading
    import time
    from types import SimpleNamespace

    from synthwatch.schemas.envelope import EnvelopeVerifier
    from synthwatch.stream_apps.app import WorkerContext, create_app
    from synthwatch.stream_apps.delivery.service import BudgetUnit
    from synthwatch.stream_apps.detect.intake import Intake
    from synthwatch.stream_apps.detect.novelty import NoveltyDetector
    from synthwatch.stream_apps.detect.region import DetectionConfig, RegionDetector

    subscriptions = tmp_path / "subscriptions.yaml"
    subscriptions.write_text(subscriptions_yaml(), encoding="utf-8")
    subscriptions.chmod(0o600)
    settings = Settings(subscriptions_file=subscriptions, webhook_allowed_networks=list(LOOPBACK))
    built: list[DeliveryService] = []
    original = DeliveryService.from_settings.__func__  # type: ignore[attr-defined]

    def spy(cls: type[DeliveryService], *args: Any, **options: Any) -> DeliveryService:
        built.append(original(cls, *args, **options))
        return built[-1]

    monkeypatch.setattr(DeliveryService, "from_settings", classmethod(spy))
    ctx = WorkerContext(
        settings=settings,
        client=db,
        sink=SimpleNamespace(lock=threading.Lock(), store_rejects=None, store_alerts=None),  # type: ignore[arg-type]
        intake=Intake(verifier=EnvelopeVerifier({org.org_id: org for org in _keys_file(tmp_path)})),
        regions=RegionDetector(DetectionConfig.from_settings(settings)),
        novelty=NoveltyDetector(DetectionConfig.from_settings(settings).novelty),
        started_at=time.monotonic(),
    )
    create_app(ctx, "127.0.0.1:9", 6066)
    (service,) = built
    assert service._unit(LIMS[2]) == BudgetUnit("lims-ml", organisation=True)
    assert service._unit("LAB-UNCLAIMED") == BudgetUnit("LAB-UNCLAIMED")


# --- corrections ------------------------------------------------------------------------------------------------------


def test_a_day_of_corrections_of_weeks_of_alerts_sent_at_once_is_held_to_one_budget(db: Any) -> None:
    """A flooding lab raised ``BUDGET`` alerts a day for three days, all sent at once (within its budget), then
    corrects every report behind them on one day: the officer gets ``BUDGET`` correction notices at once (they acted
    on those alerts), the rest in the digest with the reason, and one notice per channel saying so: not 30 at once.
    The count is read back after a restart (the second service sees the first one's corrections)."""
    days = 3
    alerts = [
        alert
        for back in range(days, 0, -1)
        for alert in _flood(BUDGET, [FLOODER], start=100 * back, detected_at=NOW - timedelta(days=back))
    ]
    fixes = [_correction(alert, n, NOW) for n, alert in enumerate(alerts)]
    with SmtpServer() as smtp:

        async def scenario() -> tuple[WebhookReceiver, list[list[Any]], list[list[Any]]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                sent = await service.handle_batch(alerts)
                for officer in (BAMAKO, PARIS):
                    assert _statuses(sent, officer) == ["delivered"] * days * BUDGET
                got = await service.handle_batch(fixes[:4])
                await service.close()
                restarted = _service(db, hooks, smtp)
                got += await restarted.handle_batch(fixes[4:])
                await _send_bamako_digest(restarted)
                await restarted.close()
                return hooks, got

        hooks, got = asyncio.run(scenario())
    for officer in (BAMAKO, PARIS):
        assert _statuses(got, officer) == ["delivered"] * BUDGET + ["queued_digest"] * (days - 1) * BUDGET
    # The digest lists the held corrections and says the budget held them (a notice went out), not that they were
    # below the officer's threshold
    (digest,) = [r.json() for r in hooks.accepted("bamako") if r.json()["kind"] == "digest"]
    assert len(digest["alerts"]) == (days - 1) * BUDGET and digest["alerts_over_budget"] == (days - 1) * BUDGET
    assert f"{(days - 1) * BUDGET} n'étaient pas sous votre seuil" in digest["text"]
    at_once = [r.json()["alert"] for r in hooks.accepted("bamako") if r.json()["kind"] == "alert"]
    assert len([a for a in at_once if a["alert_type"] == "correction"]) == BUDGET
    assert len([m for m in _alert_mails(smtp) if m.startswith("correction:")]) == BUDGET

    (notice,) = _notices_on_hook(hooks)  # one, naming the correcting lab, distinct from a first-sighting notice's
    assert notice["notice"] == "correction_budget" and notice["alert_types"] == ["correction"]
    assert notice["reporter"] == FLOODER and notice["immediate_sent"] == BUDGET and notice["language"] == "fr"
    assert notice["notice_id"] != budget_notice_id(FLOODER, NOW.date())
    assert "rectifications" in notice["text"] and FLOODER in notice["subject"]
    (mail,) = _notice_mails(smtp)
    body = mail.get_body(("plain",)).get_content()
    assert f"{BUDGET} correction notices at once" in body and "daily digest" in body
    assert mail["X-Synthwatch-Notice-Id"] == notice["notice_id"]

    reasons = db.query(
        "SELECT DISTINCT reason FROM deliveries WHERE alert_type = 'correction' AND status = 'queued_digest'"
    ).result_rows
    assert [r[0] for r in reasons] == [
        f"over the immediate budget ({BUDGET} correction notices a day per reporter; {FLOODER} on "
        f"{NOW.date().isoformat()}): queued for the daily digest"
    ]
    queued = db.query(
        "SELECT count() FROM deliveries WHERE alert_type = 'correction' AND status = 'queued_digest'"
    ).result_rows
    assert queued == [(2 * (days - 1) * BUDGET,)]


def test_corrections_count_on_the_correcting_reporter_not_on_the_corrected_alerts_other_reporters(
    db: Any,
) -> None:
    """The corrected alerts were named by the flooding lab and an honest one: the flood of corrections (signed by the
    flooding lab) uses up the flooding lab's correction budget only; the honest lab's corrections still go at once."""
    shared = [
        alert
        for back in (2, 1)  # within both labs' first-sighting budgets: all sent at once
        for alert in _flood(BUDGET, [FLOODER, HONEST], start=100 * back, detected_at=NOW - timedelta(days=back))
    ]
    fixes = [_correction(alert, n, NOW) for n, alert in enumerate(shared)]
    honest = _flood(1, [HONEST], start=500, detected_at=NOW - timedelta(days=3))
    old = ReportFacts("H-0", "lab_detection", f"lab:{HONEST}", "isotonitazene")
    new = parse_event_object(
        lab(event_id="H-0-fix", corrects="H-0", lab_id=HONEST, substance={"name": "protonitazene"})
    )
    honest_fix = correction_notice(cited(honest[0]), old, new, "protonitazene", NOW)
    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                service = _service(db, hooks, smtp)
                await service.handle_batch([*shared, *honest])
                got = await service.handle_batch([*fixes, honest_fix])
                await service.close()
                return got

        got = asyncio.run(scenario())
    for officer in (BAMAKO, PARIS):
        assert _statuses(got, officer) == ["delivered"] * BUDGET + ["queued_digest"] * BUDGET + ["delivered"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_correction_notice_names_the_reporter_and_the_count_with_hostile_text_escaped(language: str) -> None:
    day = datetime(2026, 12, 7, tzinfo=UTC).date()
    for organisation in (False, True):
        message = render_budget_notice(
            "budget-2026-12-07-abc", HOSTILE, day, BUDGET, BUDGET, language, organisation=organisation, corrections=True
        )
        plain = render_budget_notice("budget-2026-12-07-abc", HOSTILE, day, BUDGET, BUDGET, language)
        assert message.text != plain.text and message.subject != plain.subject
        assert "<script>" not in message.html and "&lt;script&gt;" in message.html
        assert "\nFrom: evil" not in message.text and "\\nFrom: evil" in message.text
        assert "\u202e" not in message.text + message.html + message.subject and "\n" not in message.subject
        for text in (message.text, message.html):
            assert "budget-2026-12-07-abc" in text and str(BUDGET) in text
        assert {"en": "correction", "fr": "rectification", "ar": "تصحيح"}[language] in message.text


class _CountingClient:
    """The test's chDB client, counting the queries that read the immediate budget back."""

    def __init__(self, client: Any) -> None:
        self.client, self.budget_reads = client, 0

    def query(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self.budget_reads += "ARRAY JOIN reported_by" in sql
        return self.client.query(sql, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_batch_of_first_sightings_and_corrections_reads_both_budgets_in_one_query(db: Any) -> None:
    """Both budgets are counted apart but read back by one query per batch (two scans and round trips before), and
    each count stays its own: ``BUDGET`` first sightings and ``BUDGET`` corrections of the day go at once, the rest
    of each to the digest."""
    earlier = _flood(BUDGET + 2, [FLOODER], start=100, detected_at=NOW - timedelta(days=1))
    batch = [
        *_flood(BUDGET + 2, [FLOODER], start=300),
        *(_correction(alert, n, NOW) for n, alert in enumerate(earlier[:BUDGET])),
        *(_correction(alert, n, NOW) for n, alert in enumerate(_flood(2, [FLOODER], start=200), start=50)),
    ]
    counting = _CountingClient(db)
    with SmtpServer() as smtp:

        async def scenario() -> list[list[Any]]:
            async with WebhookReceiver() as hooks:
                for service, alerts in (
                    (_service(db, hooks, smtp, now=NOW - timedelta(days=1)), earlier),
                    (_service(db, hooks, smtp), _flood(2, [FLOODER], start=200)),
                ):
                    await service.handle_batch(alerts)
                    await service.close()
                service = _service(counting, hooks, smtp)
                got = await service.handle_batch(batch)
                await service.close()
                return got

        got = asyncio.run(scenario())
    assert counting.budget_reads == 1
    for officer in (BAMAKO, PARIS):
        statuses = _statuses(got, officer)
        first, fixes = statuses[: BUDGET + 2], statuses[BUDGET + 2 :]
        assert first == ["delivered"] * (BUDGET - 2) + ["queued_digest"] * 4
        assert fixes == ["delivered"] * BUDGET + ["queued_digest"] * 2
