"""Delivering alerts to liaison officers: route, send once per (alert, officer, channel), record every attempt.

Never twice: before sending, the service asks an in-memory set and then ClickHouse whether (alert,
officer, channel) was already delivered or queued for the digest, so a restarted worker or a replayed
alerts topic sends nothing again. Every attempt is written to ``deliveries`` as it happens. The one
window left (sent, then the process dies before the row is written) is covered on the receiving side:
webhooks carry a signed delivery id derived from (alert, officer, channel), e-mails a Message-ID derived
from the same.

Never lost: the Faust agent acknowledges an alert only once all its deliveries are final (delivered,
gave up, or queued for the digest); a crash replays the unacknowledged alerts and the check above skips
what was done. A delivery that gave up is not final for a replay: nothing reached the officer.

Nobody waits for a broken channel: each delivery is its own task with the channel's timeout and
exponential backoff between attempts, and the agent keeps taking alerts meanwhile (Kafka commits stop at
the oldest unfinished alert, which is what makes a crash replay it). Attempts are limited per receiving
endpoint and in total, and a delivery holds neither slot while it waits to retry; an endpoint that keeps
failing has its circuit opened (:mod:`.endpoints`): its deliveries are deferred (a ``deferred`` row says
so) until a probe gets through, so one hung receiver costs the others nothing.

No flood at once: an officer gets at most ``immediate_budget`` first-sighting alerts (:data:`BUDGETED_TYPES`) a day
at once from one reporter (one organisation of the keys file, whatever lab ids it reports as; a reporter no
organisation claims on its own); the next ones of that day go to the daily digest (a ``queued_digest`` row says why)
and the officer gets one notice per reporter and day (:meth:`DeliveryService._budget`;
docs/security.md#immediate-budget). Correction notices count on a budget of their own of the same size, per officer,
unit of the correcting reporter and day (:data:`CORRECTION`): beyond it, they go to the digest too, with one notice of
their own.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import random
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import faust

from synthwatch.errors import SynthwatchError
from synthwatch.redaction import redact
from synthwatch.schemas import Alert
from synthwatch.schemas.envelope import Organisation
from synthwatch.schemas.text import visible
from synthwatch.settings import Settings
from synthwatch.stream_apps.delivery.email import SmtpConfig, SmtpSender, build_email, message_id
from synthwatch.stream_apps.delivery.endpoints import Endpoint, EndpointLimits, Endpoints
from synthwatch.stream_apps.delivery.messages import (
    Message,
    digest_listed,
    render_alert,
    render_budget_notice,
    render_digest,
)
from synthwatch.stream_apps.delivery.results import SendResult
from synthwatch.stream_apps.delivery.subscriptions import (
    EmailChannel,
    Officer,
    Recipient,
    Subscriptions,
    SubscriptionsError,
    WebhookChannel,
    load_subscriptions,
    readable_secrets,
    recipients,
    secret_problems,
)
from synthwatch.stream_apps.delivery.webhook import WebhookSender, delivery_id
from synthwatch.stream_apps.storage.deliveries import BudgetKey, DeliveryStore, Key, QueuedAlert
from synthwatch.stream_apps.storage.retries import retry_until_done
from synthwatch.stream_apps.storage.tables import NO_DAY, Attempt, DeliveryStatus

if TYPE_CHECKING:
    # clickhouse-connect is imported where a client is opened: in the worker, by the thread that opens it.
    from clickhouse_connect.driver.client import Client

log = logging.getLogger("synthwatch.delivery")
T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts per delivery and the backoff between them: base * 2**(n-1), capped, +-jitter."""

    max_attempts: int = 5
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.2
    stale_after_s: float = 7 * 86400.0  # an alert older than this (replayed after a long outage) is not sent
    digest_hold_s: float = 3600.0  # after a digest gave up, wait this long before trying it again

    def delay(self, attempt: int) -> float:
        base = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return float(base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one (alert, officer, channel) ended in this call; ``skipped`` = done before, sent by nobody now."""

    alert_id: str
    officer_id: str
    channel: str
    status: Literal["delivered", "gave_up", "queued_digest", "digest_sent", "skipped"]
    attempts: int
    reason: str


#: Alert types the immediate budget counts: those one reporter's reports raise on their own, one per substance (and
#: region), so that a lab sending invented structures raises one per report: a new substance (critical for an
#: opioid), its first report in each region, a name tied to it, its spread across regions (tipped by one report).
#: Not spikes (they need a baseline of many reports), not corrections (a budget of their own, :data:`CORRECTION`; a
#: correction of an alert held back by the budget follows it to the digest, :meth:`DeliveryService._plans`).
BUDGETED_TYPES = frozenset({"new_substance", "first_in_region", "identified", "spread"})
CORRECTION = "correction"
"""``alert_type`` of a correction notice. Corrections count on a budget of their own, of the same size, per officer,
unit of the correcting reporter and officer's day of the correction's detection: the first ones of a day go at once (an
officer acted on the alert), but one organisation correcting on one day the reports behind weeks of alerts it raised
within its budget (10 a day for 30 days) sent each officer 300 correction notices at once."""
BUDGET_NOTICE_TYPE = "budget_notice"
"""``alert_type`` of the rows of a budget notice's delivery."""
OVER_BUDGET = "over the immediate budget"
"""How the reason of a ``queued_digest`` row held back by the budget begins (the digest counts them)."""
FOLLOWS_HELD = f"{OVER_BUDGET} (the corrected alert was held back by it)"
"""How the reason of a correction that followed its held alert to the digest begins: no notice went out for it (the
digest's count of alerts the budget held back leaves it out)."""


def budget_notice_id(reporter: str, day: date) -> str:
    """The notice about ``reporter``'s alerts of ``day``: one id per (reporter, day), so one notice per officer and
    channel (the delivery key), on any worker, after any restart. The reporter is hashed: it comes from a report."""
    digest = hashlib.sha256(f"{reporter}\x1f{day.isoformat()}".encode()).hexdigest()[:16]
    return f"budget-{day.isoformat()}-{digest}"


@dataclass(frozen=True, slots=True, order=True)
class BudgetUnit:
    """Whose budget an alert counts on: an organisation of the keys file (``organisation``; every lab id and agency it
    may report as shares it), or a reporter no organisation claims (the lab id or agency as the alert names it);
    ``corrections``: its budget of correction notices (:data:`CORRECTION`), counted apart from first sightings."""

    name: str
    organisation: bool = False
    corrections: bool = False

    @property
    def notice_key(self) -> str:
        """What the notice id is derived from: the reporter's name as before organisations counted (the ids of
        notices already sent stay), an organisation's with a prefix no reporter name has (no control characters);
        a correction budget's with one more, so its notice is not taken for the first-sighting one (one per key)."""
        key = f"\x1eorg\x1e{self.name}" if self.organisation else self.name
        return f"\x1ecorrections\x1e{key}" if self.corrections else key


UnitKey = tuple[str, BudgetUnit, date]
"""(officer_id, unit, day): what the immediate budget counts alerts per (the store counts per reporter name)."""


def budget_units(organisations: Collection[Organisation]) -> tuple[dict[str, str], dict[str, frozenset[str]]]:
    """(reporter name -> its organisation, organisation -> its reporter names) from the keys file, for the budget.

    Alerts name bare lab ids and agencies (``reported_by``). A name more than one organisation claims (the keys file
    refuses one lab id or agency under two organisations, but one's lab id may be spelt like another's agency) is
    no organisation's: it keeps its own budget, as before. Charged to all of them, one organisation's flood through
    it would use up the others' budgets (their honest reports to the digest); charged to any one, the others'
    reports through it would use up that one's. Its own budget is one more than the claimants' and is the keys
    file's doing, never a reporter's.
    """
    claims: defaultdict[str, set[str]] = defaultdict(set)
    for org in organisations:
        for name in org.lab_ids | org.agencies:
            claims[name].add(org.org_id)
    shared = sorted(name for name, orgs in claims.items() if len(orgs) > 1)
    if shared:
        log.warning(
            "immediate budget: %d reporter names are claimed by several organisations and keep a budget of their "
            "own (a lab id spelt like another organisation's agency?): %s",
            len(shared),
            ", ".join(repr(name[:64]) for name in shared[:10]),
        )
    org_of = {name: next(iter(orgs)) for name, orgs in claims.items() if len(orgs) == 1}
    names: defaultdict[str, set[str]] = defaultdict(set)
    for name, org_id in org_of.items():
        names[org_id].add(name)
    return org_of, {org_id: frozenset(found) for org_id, found in names.items()}


@dataclass(frozen=True, slots=True)
class BudgetNotice:
    """An officer's notice that ``reporter``'s first-sighting alerts (``corrections``: correction notices) of ``day``
    passed the immediate budget; ``organisation``: ``reporter`` is an organisation's id (its budget covers every lab id
    it reports as)."""

    notice_id: str
    reporter: str
    day: date
    sent: int
    budget: int
    organisation: bool = False
    corrections: bool = False


class ResendError(SynthwatchError, ValueError):
    """A resend that cannot be done; the message says why and what to do instead."""


def webhook_payload(alert: Alert, officer: Officer, route: str, message: Message, channel: str) -> dict[str, Any]:
    """What a webhook receives for one alert: the rendered message (the officer's language) and the alert.

    ``delivery_id`` (signed, see ``webhook.sign``) is what receivers de-duplicate on: one per
    (alert, officer, channel), the same on every retry.
    """
    return {
        "kind": "alert",
        "delivery_id": delivery_id(alert.alert_id, officer.id, channel),
        "alert_id": alert.alert_id,
        "officer_id": officer.id,
        "route": route,
        "language": message.language,
        "subject": message.subject,
        "text": message.text,
        "link": message.links[0] if message.links else None,
        "alert": alert.model_dump(mode="json"),
    }


def digest_payload(
    digest_id: str, officer: Officer, alerts: Sequence[Alert], message: Message, held: int = 0
) -> dict[str, Any]:
    """What a webhook receives for a digest: the alerts its message lists (most severe first, at most
    ``DIGEST_MAX_LISTED``), how many more it covers without listing them, and how many of all it covers were
    held back by a reporter's immediate budget (``alerts_over_budget``)."""
    listed, more = digest_listed(alerts)
    return {
        "kind": "digest",
        "delivery_id": delivery_id(digest_id),
        "digest_id": digest_id,
        "officer_id": officer.id,
        "language": message.language,
        "subject": message.subject,
        "text": message.text,
        "links": list(message.links),
        "alerts": [alert.model_dump(mode="json") for alert in listed],
        "alerts_not_listed": more,
        "alerts_over_budget": held,
    }


def budget_notice_payload(notice: BudgetNotice, officer: Officer, message: Message, channel: str) -> dict[str, Any]:
    """What a webhook receives for a budget notice (``kind: notice``): the reporter, the day, how many alerts went at
    once; ``delivery_id`` as for alerts (one per notice, officer and channel)."""
    return {
        "kind": "notice",
        "notice": "correction_budget" if notice.corrections else "immediate_budget",
        "delivery_id": delivery_id(notice.notice_id, officer.id, channel),
        "notice_id": notice.notice_id,
        "officer_id": officer.id,
        "reporter": notice.reporter,
        "organisation": notice.reporter if notice.organisation else None,
        "day": notice.day.isoformat(),
        "immediate_sent": notice.sent,
        "immediate_budget": notice.budget,
        "alert_types": [CORRECTION] if notice.corrections else sorted(BUDGETED_TYPES),
        "language": message.language,
        "subject": message.subject,
        "text": message.text,
    }


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


Send = Callable[[], Awaitable[SendResult]]
#: The rows recording one attempt: (attempt number, status, result, when, milliseconds) -> rows.
AttemptRows = Callable[[int, DeliveryStatus, SendResult, datetime, float], list[Attempt]]


def _channel_attempt(
    recipient: Recipient,
    attempt: int,
    status: DeliveryStatus,
    result: SendResult,
    at: datetime,
    duration_ms: float,
    **about: Any,
) -> Attempt:
    """One ``deliveries`` row of an attempt on ``recipient``'s channel; ``about`` names what was sent (an alert's or a
    budget notice's id, type, reporters...)."""
    channel = recipient.channel
    return Attempt(
        officer_id=recipient.officer.id,
        channel=channel.name,
        channel_type=channel.type,
        route=recipient.route.name or "",
        attempt=attempt,
        status=status,
        reason=redact(result.reason),  # an HTTP client's error may quote the URL with its user:password@
        response_code=result.code,
        target=channel.target,
        at=at,
        duration_ms=round(duration_ms, 3),
        **about,
    )


def _refuse(reason: str) -> SendResult:
    """A send that is not even tried (a configuration problem: retrying cannot help)."""
    return SendResult(False, None, reason)


SMTP_ENDPOINT = "smtp"


def _detected_since(corrections: Sequence[Alert], now: datetime) -> datetime | None:
    """The earliest detection of the alerts ``corrections`` are about (they carry it, ``corrected_detected_at``), or
    None when one does not (a notice raised before they did, or a value that is no time): then no bound. Never after
    ``now``: it is the detecting worker's clock, and one ahead of this worker's by more than held_back's margin
    passed the rows this worker wrote, so a held alert's correction went out at once."""
    found: list[datetime] = []
    for correction in corrections:
        value = correction.details.get("corrected_detected_at")
        try:
            moment = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            return None
        found.append(moment)
    return min([*found, now]) if found else None


class DeliveryService:
    """Routes alerts to officers and delivers each (alert, officer, channel) at most once; see the module doc."""

    def __init__(
        self,
        subscriptions: Subscriptions,
        store: DeliveryStore,
        *,
        grafana_url: str = "http://localhost:3000",
        smtp: SmtpConfig | None = None,
        allowed_networks: Sequence[str] = (),
        endpoint_limits: EndpointLimits | None = None,
        policy: RetryPolicy | None = None,
        subscriptions_file: Path | None = None,
        max_in_flight: int = 256,
        store_retries: int | None = None,
        remember: int = 100_000,
        clock: Callable[[], datetime] = utc_now,
        immediate_budget: int = 10,
        organisations: Collection[Organisation] = (),
    ) -> None:
        self.subscriptions = subscriptions
        self.store = store
        self.grafana_url = grafana_url
        self.allowed_networks = tuple(allowed_networks)
        self.policy = policy or RetryPolicy()
        self.subscriptions_file = subscriptions_file
        self.store_retries = store_retries  # None: wait for ClickHouse as long as it takes, like the sink
        self.clock = clock
        self.webhook = WebhookSender(policy=subscriptions.target_policy(self.allowed_networks))
        self.email = SmtpSender(smtp) if smtp is not None else None
        self.endpoints = Endpoints(endpoint_limits)
        self._unusable = self._check_secrets()
        self._unwritten: list[tuple[list[Attempt], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._rendered: OrderedDict[tuple[str, str, str], Message] = OrderedDict()
        self._remember_max = remember
        self._done: OrderedDict[Key, None] = OrderedDict()
        self._inflight: dict[Key, asyncio.Task[Outcome]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)  # attempts in flight, all endpoints together
        self._digest_lock = asyncio.Lock()
        self._digest_hold: dict[tuple[str, str], datetime] = {}
        self._mtime = self._file_mtime()
        self.immediate_budget = immediate_budget  # 0: no budget
        # The budget's unit of each reporter name the keys file gives an organisation, and back (the worker's keys
        # file as it started: the intake's organisations, applied to stored lab ids when the count is read)
        self._org_of, self._names_of = budget_units(organisations)
        # (officer, unit, budget day) -> alerts let through at once: read from the store for each batch that
        # needs it (a restart, other workers), plus this worker's own decisions not yet recorded
        self._granted: defaultdict[UnitKey, set[str]] = defaultdict(set)

    @classmethod
    def from_settings(
        cls, settings: Settings, client: Client, lock: threading.Lock | None = None, **options: Any
    ) -> DeliveryService:
        """The worker's service: subscriptions from ``settings.subscriptions_file`` (errors name file:line);
        ``options`` may give ``organisations`` (the worker's, from its intake: the budget counts per organisation)."""
        if settings.subscriptions_file is None:
            raise ValueError("settings.subscriptions_file is not set: there is nobody to deliver to")
        limits = EndpointLimits(
            concurrency=settings.delivery_endpoint_concurrency,
            failures_to_open=settings.delivery_breaker_failures,
            cooldown_s=settings.delivery_breaker_cooldown_s,
        )
        return cls(
            load_subscriptions(settings.subscriptions_file, settings.webhook_allowed_networks),
            DeliveryStore(client, lock),
            grafana_url=settings.grafana_url,
            smtp=SmtpConfig.from_settings(settings),
            subscriptions_file=settings.subscriptions_file,
            allowed_networks=settings.webhook_allowed_networks,
            endpoint_limits=limits,
            immediate_budget=settings.delivery_immediate_budget,
            **options,
        )

    def _check_secrets(self) -> dict[str, str]:
        """Channels that cannot be signed for here (unset, short or shared secret): logged, never sent on."""
        exposed = readable_secrets(self.subscriptions_file, self.subscriptions) if self.subscriptions_file else None
        if exposed:
            log.warning("subscriptions: %s", exposed)
        found = secret_problems(self.subscriptions)
        for key, why in found.items():
            log.error("webhook %s: %s; its deliveries will be refused until this is fixed", key, why)
        return found

    # --- alerts ------------------------------------------------------------------------------------------

    async def submit(self, alerts: Sequence[Alert]) -> list[asyncio.Future[list[Outcome]]]:
        """Route, skip what was done, queue digests, start deliveries; one future per alert.

        Returns once the decisions are recorded; a future completes when all of its alert's deliveries
        are final, and is cancelled (never completed) when a delivery was interrupted by shutdown.
        """
        plans = await self._plans(alerts)
        budgeted = self._budget_keys(plans)
        notices = {
            (budget_notice_id(unit.notice_key, day), recipient.officer.id, recipient.channel.name)
            for recipient, (_, unit, day) in budgeted
        }
        unknown = {
            key
            for alert, found in plans
            for key in (r.key(alert.alert_id) for r in found)
            if key not in self._done and key not in self._inflight
        } | {key for key in notices if key not in self._done and key not in self._inflight}
        if unknown:
            self._remember(await self._store("checking earlier deliveries", self.store.finished, unknown))
        if budgeted:
            await self._load_granted({key for _, key in budgeted})
        now = self.clock()
        queued: list[Attempt] = []
        tickets: list[asyncio.Future[list[Outcome]]] = []
        for alert, found in plans:
            settled: list[Outcome] = []
            tasks: list[asyncio.Task[Outcome]] = []
            age = (now - alert.detected_at).total_seconds()
            for recipient in found:
                key = recipient.key(alert.alert_id)
                done = key in self._done or key in self._inflight
                # Over the immediate budget: its notices (one per reporter and day; a replayed alert held back before
                # sends a notice its first pass did not finish). A done alert is only looked at, never counted again.
                over = [] if age > self.policy.stale_after_s else self._budget(alert, recipient, grant=not done)
                tasks.extend(self._notices(over, recipient))
                if done:
                    why = "already delivered or queued" if key in self._done else "already being delivered"
                    settled.append(Outcome(*key, "skipped", 0, why))
                elif age > self.policy.stale_after_s:
                    reason = (
                        f"stale: detected {age / 3600:.0f} h ago, older than the {self.policy.stale_after_s:g} s limit"
                    )
                    queued.append(self._attempt(alert, recipient, 0, "gave_up", SendResult(False, None, reason), now))
                    settled.append(Outcome(*key, "gave_up", 0, reason))
                elif not recipient.immediate or over:
                    if over:
                        reason = self._over_reason(over)
                    elif alert.alert_type == CORRECTION:  # of an alert held back by the budget (_plans)
                        reason = f"{FOLLOWS_HELD}: queued for the daily digest"
                    else:
                        reason = "below the immediate threshold: queued for the daily digest"
                    row = self._attempt(alert, recipient, 0, "queued_digest", SendResult(False, None, reason), now)
                    row.alert_json = alert.model_dump_json()
                    queued.append(row)
                    self._remember([key])
                    settled.append(Outcome(*key, "queued_digest", 0, reason))
                else:
                    task = asyncio.create_task(self._deliver(alert, recipient), name=f"deliver {'/'.join(key)}")
                    self._inflight[key] = task
                    tasks.append(task)
            tickets.append(asyncio.ensure_future(self._ticket(settled, tasks)))
        if queued:
            await self._store("recording digest queue", self.store.record, queued)
        return tickets

    # --- the immediate budget ------------------------------------------------------------------------------

    def _budget_keys(self, plans: Sequence[tuple[Alert, list[Recipient]]]) -> list[tuple[Recipient, UnitKey]]:
        """Each (recipient, (officer, unit, day)) the budget looks at in these plans: immediate recipients of
        first-sighting alerts, per unit of the reporters the alert names, on the officer's day of its detection."""
        return [
            (recipient, key)
            for alert, recipients_ in plans
            for recipient in recipients_
            for key in self._counted_on(alert, recipient)
        ]

    def _unit(self, reporter: str, corrections: bool = False) -> BudgetUnit:
        """The budget ``reporter`` (a lab id or agency, as alerts name it) counts on: its organisation's, if one
        organisation claims it, else its own; ``corrections``: its budget of correction notices."""
        org_id = self._org_of.get(reporter)
        if org_id is None:
            return BudgetUnit(reporter, corrections=corrections)
        return BudgetUnit(org_id, organisation=True, corrections=corrections)

    def _counted_on(self, alert: Alert, recipient: Recipient) -> list[UnitKey]:
        """The (officer, unit, day) keys the budget counts ``alert`` on for ``recipient``: one per unit of the
        reporters it names (an alert named by two lab ids of one organisation counts once on it), on the officer's
        day of its detection; none when the budget is off, the type is not counted or the recipient would not get it
        at once anyway (a correction of an alert held back follows it to the digest uncounted).

        A correction counts on the budget of corrections of the reporter that corrected (its ``reported_by``: the
        signer of the correcting report), never on the corrected alert's reporters: those may include other
        organisations that reported the same substance, whose budgets a flooding corrector would use up (their own
        corrections to the digest) and, as any unit within budget lets an alert through, ride on."""
        corrections = alert.alert_type == CORRECTION
        if self.immediate_budget <= 0 or not recipient.immediate:
            return []
        if not corrections and alert.alert_type not in BUDGETED_TYPES:
            return []
        day = recipient.officer.local_day(alert.detected_at)
        units = sorted({self._unit(reporter, corrections) for reporter in alert.reported_by})
        return [(recipient.officer.id, unit, day) for unit in units]

    async def _load_granted(self, keys: Collection[UnitKey]) -> None:
        """Add what the store knows (rows of earlier runs and of other workers) to the alerts let through at once.

        The store keeps the reporter names the alerts named; an organisation's count is read as its names' (the
        keys file's today), one alert id once however many of them it names. Corrections are counted apart (their
        type; their rows carry a budget day since they count), read by the same query."""
        names: dict[bool, set[BudgetKey]] = {False: set(), True: set()}
        for officer_id, unit, day in keys:
            for name in self._names_of.get(unit.name, frozenset()) if unit.organisation else (unit.name,):
                names[unit.corrections].add((officer_id, name, day))
        stored = await self._store(
            "counting immediate alerts per reporter",
            self.store.immediate_alerts_by_kind,
            {kind: (wanted, [CORRECTION] if kind else BUDGETED_TYPES) for kind, wanted in names.items()},
        )
        # Days no alert can still be sent at once on (older than the stale limit; an officer's day is less than a
        # day off UTC's) are forgotten, never a day this batch counts on: a replay after an outage of days brings
        # alerts detected days ago, and forgetting their day gave each batch of them a whole budget again.
        stale = self.clock() - timedelta(seconds=self.policy.stale_after_s)
        oldest = stale.date() - timedelta(days=1)
        for key in [k for k in self._granted if k[2] < oldest and k not in keys]:
            del self._granted[key]
        for corrections, found in stored.items():
            for (officer_id, name, day), alert_ids in found.items():
                self._granted[(officer_id, self._unit(name, corrections), day)] |= alert_ids

    def _budget(self, alert: Alert, recipient: Recipient, *, grant: bool) -> list[BudgetNotice]:
        """Empty when ``alert`` goes to ``recipient`` at once, else a notice per unit it is over the budget for.

        Counted per officer, unit (:meth:`_unit`: an organisation, or a reporter none claims) and the officer's day of
        the alert's ``detected_at`` (the worker's clock when it raised the alert: a report's own dates are the
        reporter's to choose, and a replay keeps the day). An alert named by reporters of several units goes at once
        if any of them is within budget (a flooding lab cannot silence another organisation's report of the same
        substance) and counts against each. One alert counts once (its id), on
        every channel of the officer and at every replay. ``grant`` records it as let through.
        """
        keys = self._counted_on(alert, recipient)
        if not keys:
            return []
        sent = [self._granted.get(key, set()) for key in keys]
        if any(alert.alert_id in ids or len(ids) < self.immediate_budget for ids in sent):
            if grant:
                for key in keys:
                    self._granted[key].add(alert.alert_id)
            return []
        return [
            BudgetNotice(
                budget_notice_id(unit.notice_key, day),
                unit.name,
                day,
                len(ids),
                self.immediate_budget,
                unit.organisation,
                unit.corrections,
            )
            for (_, unit, day), ids in zip(keys, sent, strict=True)
        ]

    def _over_reason(self, over: Sequence[BudgetNotice]) -> str:
        reporters = ", ".join(("organisation " if n.organisation else "") + visible(n.reporter[:100]) for n in over)
        counted = "correction notices" if over[0].corrections else "first-sighting alerts"
        return (
            f"{OVER_BUDGET} ({self.immediate_budget} {counted} a day per reporter; "
            f"{reporters} on {over[0].day.isoformat()}): queued for the daily digest"
        )

    def _notices(self, over: Sequence[BudgetNotice], recipient: Recipient) -> list[asyncio.Task[Outcome]]:
        """Start the budget notices not sent (nor being sent) to this officer on this channel yet."""
        tasks = []
        for notice in over:
            key = (notice.notice_id, recipient.officer.id, recipient.channel.name)
            if key in self._done or key in self._inflight:
                continue
            task = asyncio.create_task(self._deliver_notice(notice, recipient), name=f"notice {'/'.join(key)}")
            self._inflight[key] = task
            tasks.append(task)
        return tasks

    async def _deliver_notice(self, notice: BudgetNotice, recipient: Recipient) -> Outcome:
        """Send one budget notice at once, with retries, recorded in ``deliveries`` like an alert's delivery."""
        officer, channel = recipient.officer, recipient.channel
        key = (notice.notice_id, officer.id, channel.name)
        try:
            send = self._refusal(recipient) or self._notice_send(notice, recipient)

            def rows(
                attempt: int, status: DeliveryStatus, result: SendResult, at: datetime, ms: float
            ) -> list[Attempt]:
                return [
                    _channel_attempt(
                        recipient,
                        attempt,
                        status,
                        result,
                        at,
                        ms,
                        alert_id=notice.notice_id,
                        alert_type=BUDGET_NOTICE_TYPE,
                        reported_by=[notice.reporter],
                        budget_day=notice.day,
                    )
                ]

            return await self._settle(key, send, rows, channel)
        finally:
            self._inflight.pop(key, None)

    def _notice_send(self, notice: BudgetNotice, recipient: Recipient) -> Send | SendResult:
        officer, channel = recipient.officer, recipient.channel
        try:
            message = render_budget_notice(
                notice.notice_id,
                notice.reporter,
                notice.day,
                notice.sent,
                notice.budget,
                officer.language,
                organisation=notice.organisation,
                corrections=notice.corrections,
            )
        except Exception as error:  # a template bug: recorded, the agent goes on
            log.exception("cannot prepare budget notice %s for %s", notice.notice_id, officer.id)
            return _refuse(f"cannot render the message: {type(error).__name__}: {error}")
        return self._send_message(
            officer,
            channel,
            message,
            lambda: budget_notice_payload(notice, officer, message, channel.name),
            "notice",
            notice.notice_id,
            message_id(notice.notice_id, officer.id, channel.name),
        )

    async def _plans(self, alerts: Sequence[Alert]) -> list[tuple[Alert, list[Recipient]]]:
        """Each alert with its recipients: by the routes, except a correction notice, which goes to whoever
        received the alert it is about (at once: a trust matter), on the same channel, never re-routed."""
        about = {str(a.details.get("corrected_alert_id", "")) for a in alerts if a.alert_type == "correction"}
        received = (
            await self._store("finding who received corrected alerts", self.store.recipients_of, about) if about else {}
        )
        # A correction follows its alert where the immediate budget held that alert back: to the digest. Else a
        # flooding reporter's correction of each held alert would reach the officer at once, one by one.
        held = (
            await self._store(
                "finding corrected alerts held by the budget",
                self.store.held_back,
                about,
                OVER_BUDGET,
                _detected_since([a for a in alerts if a.alert_type == "correction"], self.clock()),
            )
            if about and self.immediate_budget > 0
            else set()
        )
        plans: list[tuple[Alert, list[Recipient]]] = []
        for alert in alerts:
            if alert.alert_type != "correction":
                plans.append((alert, recipients(alert, self.subscriptions)))
                continue
            found: list[Recipient] = []
            for officer_id, channel_name, route_name in sorted(
                received.get(str(alert.details.get("corrected_alert_id", "")), set())
            ):
                officer = self.subscriptions.officer(officer_id)
                channel = officer.channels().get(channel_name) if officer is not None else None
                if officer is None or channel is None:  # unsubscribed since: nobody to tell on that channel
                    continue
                route = _route_named(officer, route_name, channel)
                corrected = (str(alert.details.get("corrected_alert_id", "")), officer_id, channel_name)
                found.append(Recipient(officer, route, channel, immediate=corrected not in held))
            plans.append((alert, found))
        return plans

    async def handle(self, alert: Alert) -> list[Outcome]:
        """Deliver one alert and wait until every delivery is final."""
        (ticket,) = await self.submit([alert])
        return await ticket

    async def handle_batch(self, alerts: Sequence[Alert]) -> list[list[Outcome]]:
        return list(await asyncio.gather(*await self.submit(alerts)))

    async def drain(self) -> None:
        """Wait for every delivery in progress (tests, orderly shutdown)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)

    @staticmethod
    async def _ticket(settled: list[Outcome], tasks: list[asyncio.Task[Outcome]]) -> list[Outcome]:
        return settled + list(await asyncio.gather(*tasks))

    async def _deliver(self, alert: Alert, recipient: Recipient, attempts_before: int = 0) -> Outcome:
        """Deliver with retries; ``attempts_before`` (a resend) numbers the new attempts after the old ones."""
        key = recipient.key(alert.alert_id)
        try:
            send = self._refusal(recipient) or self._lazy(alert, recipient)

            def rows(
                attempt: int, status: DeliveryStatus, result: SendResult, at: datetime, ms: float
            ) -> list[Attempt]:
                return [self._attempt(alert, recipient, attempts_before + attempt, status, result, at, ms)]

            return await self._settle(key, send, rows, recipient.channel)
        finally:
            self._inflight.pop(key, None)

    async def _settle(
        self, key: Key, send: Send | SendResult, rows: AttemptRows, channel: WebhookChannel | EmailChannel
    ) -> Outcome:
        """Try ``send`` until it is final (retries, each attempt recorded by ``rows``) and remember a delivery: the
        one path of an alert's and a budget notice's immediate delivery."""
        status, attempts, result = await self._attempts(
            send, rows, channel.timeout_s, "delivered", self._endpoint(channel)
        )
        if status == "delivered":
            self._remember([key])
        return Outcome(*key, cast(Any, status), attempts, result.reason)

    async def resend(self, delivery: str) -> Outcome:
        """Send again, by hand, an alert delivery that gave up (``synthwatch deliveries resend ID``).

        Same ``delivery_id`` (and e-mail Message-ID) as the attempts that gave up: a receiver de-duplicates
        on it, and an attempt that gave up may still have reached it (an answer lost to a timeout), so a new
        id could make it act twice on one alert. Each attempt is signed afresh (new timestamp), so replay
        windows hold; the attempts are new rows numbered after the old ones, with the usual retries. The
        officer, channel and secret are today's subscriptions: a fixed URL or secret is what a resend is for.
        """
        found = await self._store("finding the delivery", self.store.gave_up, delivery, delivery_id)
        if found is None:
            raise ResendError(
                f"no delivery {delivery!r} that gave up; list them with `synthwatch deliveries --status gave_up`"
            )
        alert_id, officer_id, channel_name = found.key
        done = await self._store("checking earlier deliveries", self.store.finished, [found.key])
        if found.last_status == "delivered" or done:
            raise ResendError(f"delivery {delivery} of alert {alert_id} to {officer_id} was delivered since")
        if not found.alert_json:
            raise ResendError(
                f"delivery {delivery} gave up before deliveries kept their alert: nothing to send it from"
            )
        officer = next((o for o in self.subscriptions.officers if o.id == officer_id), None)
        channel = officer.channels().get(channel_name) if officer is not None else None
        if officer is None or channel is None:
            raise ResendError(
                f"officer {officer_id!r} has no channel {channel_name!r} in the subscriptions file any more; "
                "add it back (or resend nothing)"
            )
        if found.key in self._inflight:
            raise ResendError(f"delivery {delivery} is being attempted right now")
        route = next((r for r in officer.routes if r.name == found.route and r.channel.name == channel_name), None)
        route = route or next(r for r in officer.routes if r.channel.name == channel_name)
        alert = Alert.model_validate_json(found.alert_json)
        recipient = Recipient(officer, route, channel, immediate=True)
        task = asyncio.create_task(self._deliver(alert, recipient, found.attempts), name=f"resend {delivery}")
        self._inflight[found.key] = task
        return await task

    def _endpoint(self, channel: WebhookChannel | EmailChannel) -> Endpoint:
        return self.endpoints[channel.endpoint if isinstance(channel, WebhookChannel) else SMTP_ENDPOINT]

    def _refusal(self, recipient: Recipient) -> SendResult | None:
        """A configuration problem that makes sending pointless (checked before any waiting)."""
        channel = recipient.channel
        if isinstance(channel, WebhookChannel):
            unusable = self._unusable.get(f"{recipient.officer.id}/{channel.name}")
            if unusable or not channel.resolve_secret():
                why = unusable or "none set"
                return _refuse(f"webhook secret refused: {why} (see `synthwatch subscriptions check`)")
        elif self.email is None:
            return _refuse("no SMTP server configured (SYNTHWATCH_SMTP_HOST)")
        return None

    def _lazy(self, alert: Alert, recipient: Recipient) -> Send:
        """A send that renders its message at its first attempt, i.e. once its endpoint lets it go:
        deliveries waiting on a hung endpoint cost nothing (no rendering in the burst the others are in).
        """
        prepared: list[Send | SendResult] = []

        async def send() -> SendResult:
            if not prepared:
                try:
                    prepared.append(self._prepare(alert, recipient))
                except Exception as error:  # a template or payload bug: record it, do not crash the agent
                    log.exception("cannot prepare %s for %s", alert.alert_id, recipient.officer.id)
                    prepared.append(_refuse(f"cannot render the message: {type(error).__name__}: {error}"))
            ready = prepared[0]
            return ready if isinstance(ready, SendResult) else await ready()

        return send

    def _prepare(self, alert: Alert, recipient: Recipient) -> Send | SendResult:
        officer, channel = recipient.officer, recipient.channel
        message = self._render(alert, officer.language, officer.timezone)
        return self._send_message(
            officer,
            channel,
            message,
            lambda: webhook_payload(alert, officer, recipient.route.name or "", message, channel.name),
            "alert",
            alert.alert_id,
            message_id(alert.alert_id, officer.id, channel.name),
        )

    def _send_message(
        self,
        officer: Officer,
        channel: WebhookChannel | EmailChannel,
        message: Message,
        payload: Callable[[], dict[str, Any]],
        event: Literal["alert", "notice", "digest"],
        about: str,
        mail_id: str,
    ) -> Send | SendResult:
        """How one message (an alert, a budget notice, a digest) goes out on the recipient's channel: to a webhook
        as its JSON ``payload`` (built only then), or as an e-mail whose ``X-Synthwatch-<Event>-Id`` header names
        ``about``. One place, so the three kinds cannot drift apart in how they are addressed and signed."""
        if isinstance(channel, WebhookChannel):
            body = payload()
            return self._webhook_send(officer, channel, _json(body), body["delivery_id"], event)
        headers = {f"X-Synthwatch-{event.capitalize()}-Id": about, "X-Synthwatch-Officer": officer.id}
        return self._email_send(channel, message, mail_id, headers)

    def _webhook_send(
        self, officer: Officer, channel: WebhookChannel, body: bytes, delivery: str, event: str
    ) -> Send | SendResult:
        unusable = self._unusable.get(f"{officer.id}/{channel.name}")
        secret = channel.resolve_secret()
        if unusable or not secret:
            return _refuse(f"webhook secret refused: {unusable or 'none set'} (see `synthwatch subscriptions check`)")
        webhook, url, timeout = self.webhook, channel.url, channel.timeout_s
        return lambda: webhook.post(url, body, secret=secret, delivery_id=delivery, event=event, timeout_s=timeout)

    def _email_send(
        self, channel: EmailChannel, message: Message, msg_id: str, headers: dict[str, str]
    ) -> Send | SendResult:
        sender = self.email
        if sender is None:
            return _refuse("no SMTP server configured (SYNTHWATCH_SMTP_HOST)")
        email = build_email(message, sender=sender.config.sender, to=channel.to, message_id=msg_id, headers=headers)
        timeout = channel.timeout_s
        return lambda: sender.send(email, timeout)

    async def _attempts(
        self,
        send: Send | SendResult,
        rows: AttemptRows,
        timeout_s: float,
        success: DeliveryStatus,
        endpoint: Endpoint,
        start: datetime | None = None,
    ) -> tuple[DeliveryStatus, int, SendResult]:
        """Try up to ``max_attempts`` times with backoff, recording each attempt; returns the final status.

        Each attempt takes a slot of its endpoint (waiting, deferred, while the endpoint's circuit is
        open) and one of the service's; both are released before the attempt is recorded and before
        the backoff, so waiting to retry holds nothing.
        """
        began = time.monotonic()

        def moment() -> datetime:
            return start + timedelta(seconds=time.monotonic() - began) if start is not None else self.clock()

        for attempt in range(1, self.policy.max_attempts + 1):
            if isinstance(send, SendResult):  # refused before any network: no endpoint involved
                result, ms, at = send, 0.0, moment()
            else:

                async def deferred(why: str, attempt: int = attempt) -> None:
                    failed = SendResult(False, None, why)
                    deferral = rows(attempt, "deferred", failed, moment(), 0)
                    await self._record(deferral)

                probe = await endpoint.turn(deferred)
                at, started = moment(), time.monotonic()
                result = SendResult(False, None, "cancelled", retryable=True)
                try:
                    async with self._slots:
                        result = await self._try(send, timeout_s)
                finally:
                    await endpoint.done(reached=result.ok or not result.retryable, probe=probe)
                ms = (time.monotonic() - started) * 1000
            status: DeliveryStatus
            if result.ok:
                status = success
            elif result.retryable and attempt < self.policy.max_attempts:
                status = "failed"
            else:
                status = "gave_up"
                if result.retryable:
                    result = SendResult(False, result.code, f"{result.reason} (gave up after {attempt} attempts)")
            await self._record(rows(attempt, status, result, at, ms))
            if status != "failed":
                if status == "gave_up":
                    log.warning("delivery gave up: %s", result.reason)
                return status, attempt, result
            await asyncio.sleep(self.policy.delay(attempt))
        raise AssertionError("unreachable: the last attempt is final")

    @staticmethod
    async def _try(send: Send, timeout_s: float) -> SendResult:
        try:
            return await asyncio.wait_for(send(), timeout_s + 5)  # backstop: senders time out on their own
        except TimeoutError:
            return SendResult(False, None, f"no answer within {timeout_s:g} s", retryable=True)
        except Exception as error:
            log.exception("delivery attempt raised")
            return SendResult(False, None, f"{type(error).__name__}: {error}", retryable=True)

    def _attempt(
        self,
        alert: Alert,
        recipient: Recipient,
        attempt: int,
        status: DeliveryStatus,
        result: SendResult,
        at: datetime,
        duration_ms: float = 0.0,
        digest_id: str = "",
    ) -> Attempt:
        return _channel_attempt(
            recipient,
            attempt,
            status,
            result,
            at,
            duration_ms,
            alert_id=alert.alert_id,
            alert_type=alert.alert_type,
            severity=alert.severity,
            substance=alert.substance.name,
            region=alert.region or "",
            digest_id=digest_id,
            # A delivery that gave up keeps its alert: `synthwatch deliveries resend` sends it from this row.
            alert_json=alert.model_dump_json() if status == "gave_up" and not digest_id else "",
            reported_by=list(alert.reported_by),
            budget_day=(
                recipient.officer.local_day(alert.detected_at)
                if alert.alert_type in BUDGETED_TYPES or alert.alert_type == CORRECTION
                else NO_DAY
            ),
        )

    # --- digests -----------------------------------------------------------------------------------------

    async def send_digests(self, now: datetime | None = None) -> list[Outcome]:
        """Send each officer's daily digest when its time has come (once per officer, channel and day).

        Run it often (the worker's timer: every minute, on the leader only); it does nothing until an
        officer's ``digest_time`` has passed in their time zone and there are queued alerts.
        """
        if self._digest_lock.locked():
            return []  # the previous run is still sending
        async with self._digest_lock:
            now = now or self.clock()
            pending = await self._store("reading the digest queue", self.store.pending_digests, now)
            if not pending:
                return []
            last = await self._store("reading the last digests", self.store.last_digests, now)
            groups: dict[tuple[str, str], list[QueuedAlert]] = defaultdict(list)
            for item in pending:
                groups[(item.officer_id, item.channel)].append(item)
            jobs = []
            for (officer_id, channel_name), items in groups.items():
                officer = self.subscriptions.officer(officer_id)
                if officer is None:
                    log.warning(
                        "digest: officer %s is no longer subscribed; %d alert(s) stay queued", officer_id, len(items)
                    )
                    continue
                moment = officer.digest_moment(now)
                previous = last.get((officer_id, channel_name))
                held = self._digest_hold.get((officer_id, channel_name))
                if now < moment or (previous is not None and previous >= moment) or (held and held > now):
                    continue
                channel = officer.channels().get(channel_name) or officer.routes[0].channel
                jobs.append(self._send_digest(officer, channel, items, now))
            return [outcome for group in await asyncio.gather(*jobs) for outcome in group]

    async def _send_digest(
        self, officer: Officer, channel: WebhookChannel | EmailChannel, items: list[QueuedAlert], now: datetime
    ) -> list[Outcome]:
        alerts: list[tuple[QueuedAlert, Alert]] = []
        for n, item in enumerate(items):
            if n and n % SLICE_ALERTS == 0:
                await asyncio.sleep(0)  # a digest may hold many queued alerts: not parsed in one piece
            try:
                alerts.append((item, Alert.model_validate_json(item.alert_json)))
            except ValueError as error:
                log.error("digest: queued alert %s is unreadable (%s); skipped", item.alert_id, error)
        if not alerts:
            return []
        day = officer.local_day(now)
        digest_id = f"digest-{officer.id}-{channel.name}-{day.isoformat()}"
        # The alerts and correction notices a budget held back (a notice went out then); not the corrections that
        # followed their held alerts (no notice for them)
        followed = sum(1 for item, _ in alerts if item.reason.startswith(FOLLOWS_HELD))
        held = sum(1 for item, _ in alerts if item.reason.startswith(OVER_BUDGET)) - followed
        try:
            message = render_digest(
                [a for _, a in alerts],
                officer.language,
                self.grafana_url,
                day,
                officer.name,
                officer.timezone,
                held,
                followed,
            )
            send = self._send_message(
                officer,
                channel,
                message,
                lambda: digest_payload(digest_id, officer, [a for _, a in alerts], message, held),
                "digest",
                digest_id,
                message_id(digest_id),
            )
        except Exception as error:
            log.exception("cannot prepare digest %s", digest_id)
            send = _refuse(f"cannot render the digest: {type(error).__name__}: {error}")

        def rows(attempt: int, status: DeliveryStatus, result: SendResult, at: datetime, ms: float) -> list[Attempt]:
            out = []
            for item, alert in alerts:
                recipient = Recipient(officer, _route_named(officer, item.route, channel), channel, immediate=False)
                out.append(self._attempt(alert, recipient, attempt, status, result, at, ms, digest_id=digest_id))
            return out

        status, attempts, result = await self._attempts(
            send, rows, channel.timeout_s, "digest_sent", self._endpoint(channel), start=now
        )
        if status == "gave_up":
            self._digest_hold[(officer.id, channel.name)] = now + timedelta(seconds=self.policy.digest_hold_s)
        return [
            Outcome(a.alert_id, officer.id, channel.name, cast(Any, status), attempts, result.reason) for _, a in alerts
        ]

    # --- plumbing ----------------------------------------------------------------------------------------

    async def _record(self, rows: list[Attempt]) -> None:
        """Write attempt rows; returns once they are stored. Rows of concurrent deliveries share one insert.

        A burst of alerts to many officers makes one row per delivery at nearly the same moment; one
        insert each, serialised on the client lock, made the last officer wait for all the others' rows.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unwritten.append((rows, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="delivery rows")
        await asyncio.shield(done)  # a cancelled delivery does not cancel the others' rows

    async def _write_pending(self) -> None:
        while self._unwritten:
            batch, self._unwritten = self._unwritten, []
            try:
                await self._store(
                    "recording delivery attempts", self.store.record, [r for rows, _ in batch for r in rows]
                )
            except Exception as error:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    def _render(self, alert: Alert, language: str, timezone: str = "UTC") -> Message:
        """One rendering per (alert, language, time zone): a burst to many officers renders each alert once or twice."""
        key = (alert.alert_id, language, timezone)
        message = self._rendered.get(key)
        if message is None:
            message = self._rendered[key] = render_alert(alert, language, self.grafana_url, timezone)
            while len(self._rendered) > 1024:
                self._rendered.popitem(last=False)
        return message

    def _remember(self, keys: Collection[Key]) -> None:
        for key in keys:
            self._done[key] = None
            self._done.move_to_end(key)
        while len(self._done) > self._remember_max:
            self._done.popitem(last=False)

    async def _store(self, what: str, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call in a thread; if ClickHouse fails, back off and retry (it holds the ack)."""
        return await retry_until_done(
            what,
            functools.partial(call, *args),
            log=log,
            give_up=lambda attempt: self.store_retries is not None and attempt >= self.store_retries,
        )

    def _file_mtime(self) -> int | None:
        try:
            return self.subscriptions_file.stat().st_mtime_ns if self.subscriptions_file else None
        except OSError:
            return None

    def reload_if_changed(self) -> bool:
        """Pick up an edited subscriptions file; a broken edit is logged and the old subscriptions kept."""
        mtime = self._file_mtime()
        if self.subscriptions_file is None or mtime is None or mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.subscriptions = load_subscriptions(self.subscriptions_file, self.allowed_networks)
        except SubscriptionsError as error:
            log.error("subscriptions file changed but is invalid; keeping the previous one:\n%s", error)
            return False
        self.webhook.policy = self.subscriptions.target_policy(self.allowed_networks)
        self._unusable = self._check_secrets()
        log.info("subscriptions reloaded: %d officer(s)", len(self.subscriptions.officers))
        return True

    async def close(self) -> None:
        """Stop: cancel deliveries in progress (their alerts stay unacknowledged and are redelivered)."""
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)
        if self._writer is not None:  # rows of attempts that did finish are still written
            await asyncio.gather(self._writer, return_exceptions=True)
        await self.webhook.close()
        if self.email is not None:
            self.email.close()


def _route_named(officer: Officer, name: str, channel: WebhookChannel | EmailChannel) -> Any:
    """The officer's route called ``name`` (it may have been renamed since the alert was queued)."""
    route = next((r for r in officer.routes if r.name == name), None)
    if route is not None:
        return route
    return next((r for r in officer.routes if r.channel.name == channel.name), officer.routes[0])


# --- Faust wiring ------------------------------------------------------------------------------------------


#: Alerts checked and parsed between two turns of the event loop (a batch holds up to 10,000; each takes tens of
#: µs): other agents, commits, the watchdog and ``/ready`` are not held up by a large batch.
SLICE_ALERTS = 250


async def deliver_alerts(
    app: Any,
    batches: AsyncIterator[list[Any]],
    service: DeliveryService,
    accept: Callable[[Any], bool] | None = None,
) -> None:
    """Submit each batch of alert events for delivery; acknowledge each when its deliveries are final.

    ``batches`` come from ``stream_apps.runtime.batches.channel_batches``, as for every other agent: events of an
    older consumer generation or taken while the flow is stopped (a seek, a rebalance) are skipped there
    *unacknowledged*, so the new generation or the seek fetches them again. Faust's ``noack_take``, used
    here before, acknowledged them unprocessed (its stream loop acks every skipped event), so an alert
    skipped that way could be committed and never delivered. An alert whose deliveries end after its
    partition was reassigned is not acknowledged either (its new owner delivers it; ids de-duplicate),
    as at checkpoints (:class:`.checkpoints.Checkpoint`).
    """
    acks: set[asyncio.Task[None]] = set()
    # Alerts left unacknowledged on purpose stay referenced: the consumer tracks events weakly, and an event
    # collected would no longer hold its partition's commit (stream_apps/runtime/transport.py, item 4), so
    # the next alerts' commits would pass it and the restart would not deliver it again.
    left: list[Any] = []

    async def ack_when_final(event: Any, ticket: asyncio.Future[list[Outcome]]) -> None:
        try:
            await ticket
        except asyncio.CancelledError:
            return  # shutting down: left unacknowledged, redelivered after the restart
        except Exception:
            log.exception(
                "delivery of alert at %s:%s failed; left unacknowledged", event.message.tp, event.message.offset
            )
            left.append(event)  # until this agent ends: after a rebalance its generation holds nothing anyway
            return
        if event.message.generation_id == app.consumer_generation_id:
            event.ack()

    async for events in batches:
        alerts: list[Alert] = []
        owners: list[Any] = []
        for n, event in enumerate(events):
            if n and n % SLICE_ALERTS == 0:
                await asyncio.sleep(0)  # a batch of up to 10,000 alerts to check and parse: not in one piece
            if accept is not None and not accept(event):
                event.ack()  # forged: never delivered (the alerts-storing agent counts and logs it)
                continue
            try:
                alerts.append(Alert.model_validate_json(event.value))
                owners.append(event)
            except ValueError as error:
                log.error(
                    "alerts topic: not an alert at %s:%s (%s)", event.message.partition, event.message.offset, error
                )
                event.ack()
        if not alerts:
            continue
        for event, ticket in zip(owners, await service.submit(alerts), strict=True):
            task = asyncio.create_task(ack_when_final(event, ticket))
            acks.add(task)
            task.add_done_callback(acks.discard)


def attach_delivery(
    app: faust.App,
    alerts_topic: faust.TopicT,
    service: DeliveryService,
    *,
    batches: Callable[[faust.StreamT[bytes]], AsyncIterator[list[Any]]],
    digest_every_s: float = 60.0,
    reload_every_s: float = 30.0,
    accept: Callable[[Any], bool] | None = None,
) -> Any:
    """Define the ``delivery`` agent on the alerts topic, the digest timer and the subscriptions reload.

    The agent (:func:`deliver_alerts`) takes batches without acknowledging them (``batches``: the
    worker's ``channel_batches``, which skips stale events unacknowledged) and acknowledges each alert
    when its deliveries are final. ``accept`` (the worker signature check) refuses records no
    worker produced: they are acknowledged, never delivered.
    """

    @app.agent(alerts_topic, name="delivery")
    async def delivery_agent(stream: faust.StreamT[bytes]) -> None:
        await deliver_alerts(app, batches(stream), service, accept)

    @app.timer(interval=digest_every_s, on_leader=True)
    async def delivery_digests() -> None:
        await service.send_digests()

    @app.timer(interval=reload_every_s)
    async def delivery_reload() -> None:
        service.reload_if_changed()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode's stub wants a keyword-only signal
    async def delivery_close(sender: Any, *args: Any, **kwargs: Any) -> None:
        await service.close()

    return delivery_agent
