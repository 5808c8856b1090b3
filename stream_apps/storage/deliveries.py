"""The ``deliveries`` table as the delivery service uses it: record attempts, find what is done or queued.

Why here and not beside the service: every ClickHouse thing lives in storage, and delivery imports
storage, never the reverse. The table's columns and its row (:class:`.tables.Attempt`) are in
:mod:`.tables`; what a delivery is and when it is sent is :mod:`synthwatch.stream_apps.delivery.service`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, TypeVar

from synthwatch.stream_apps.storage.tables import DELIVERY_COLUMNS, DELIVERY_TABLE, Attempt, utc_aware

if TYPE_CHECKING:
    # clickhouse-connect is imported where a client is opened: in the worker, by the thread that opens it.
    from clickhouse_connect.driver.client import Client

Key = tuple[str, str, str]
"""(alert_id, officer_id, channel name): what is delivered at most once."""

FINAL_STATUSES = ("delivered", "queued_digest", "digest_sent")
#: Statuses of the rows an immediate delivery writes (each attempt, or its wait on an open circuit): a row of one of
#: these with an attempt number means the alert was let through at once, whatever came of it.
IMMEDIATE_STATUSES = ("delivered", "failed", "gave_up", "deferred")

BudgetKey = tuple[str, str, date]
"""(officer_id, reporter, day): what the immediate budget counts alerts per."""
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class QueuedAlert:
    """An alert waiting for an officer's digest."""

    officer_id: str
    channel: str
    route: str
    alert_id: str
    alert_json: str
    queued_at: datetime
    reason: str = ""  # why it was queued (below the officer's threshold, or beyond a reporter's immediate budget)


@dataclass(frozen=True, slots=True)
class GaveUp:
    """A delivery that gave up, as ``deliveries resend`` finds it: its key, route, alert and attempts so far."""

    key: Key
    route: str
    alert_json: str
    attempts: int
    last_status: str


class DeliveryStore:
    """The ``deliveries`` table. Blocking (clickhouse-connect); the service calls it from threads.

    ``lock`` is the worker's client lock: the embedded engine's client is shared with the sink.
    """

    def __init__(self, client: Client, lock: threading.Lock | None = None, digest_window_days: int = 14) -> None:
        self.client = client
        self.lock = lock or threading.Lock()
        self.digest_window = timedelta(days=digest_window_days)

    def record(self, attempts: Sequence[Attempt]) -> None:
        if not attempts:
            return
        columns = [[a.row()[i] for a in attempts] for i in range(len(DELIVERY_COLUMNS))]
        with self.lock:
            self.client.insert(DELIVERY_TABLE, columns, column_names=DELIVERY_COLUMNS, column_oriented=True)

    def finished(self, keys: Collection[Key]) -> set[Key]:
        """Which keys were delivered, queued for a digest or sent in one (a point lookup per key)."""
        if not keys:
            return set()
        with self.lock:
            rows = self.client.query(
                f"SELECT DISTINCT alert_id, officer_id, channel FROM {DELIVERY_TABLE} "
                "WHERE officer_id IN %(officers)s AND alert_id IN %(alerts)s AND status IN %(final)s",
                parameters={
                    "officers": tuple({k[1] for k in keys}),
                    "alerts": tuple({k[0] for k in keys}),
                    "final": FINAL_STATUSES,
                },
            ).result_rows
        wanted = set(keys)
        return {key for key in ((str(a), str(o), str(c)) for a, o, c in rows) if key in wanted}

    def immediate_alerts(self, keys: Collection[BudgetKey], alert_types: Collection[str]) -> dict[BudgetKey, set[str]]:
        """(officer, reporter, day) -> the alerts of ``alert_types`` naming that reporter that the officer was sent
        at once on that budget day (any attempt made, on any channel; digest rows and stale give-ups excluded).

        What the immediate budget counts, read back after a restart or from other workers; one query for all the
        keys. Distinct alert ids: attempts, channels and replays of one alert count once.
        """
        return self.immediate_alerts_by_kind({None: (keys, alert_types)}).get(None, {})

    def immediate_alerts_by_kind(
        self, wanted: Mapping[K, tuple[Collection[BudgetKey], Collection[str]]]
    ) -> dict[K, dict[BudgetKey, set[str]]]:
        """:meth:`immediate_alerts` for several budgets counted apart (kind -> (keys, alert types), types disjoint
        between kinds: first sightings, corrections), in one query: a batch with both read the deliveries table
        twice, one scan and round trip each."""
        kinds = {kind: (set(keys), frozenset(types)) for kind, (keys, types) in wanted.items() if keys}
        if not kinds:
            return {}
        every = {key for keys, _ in kinds.values() for key in keys}
        with self.lock:
            rows = self.client.query(
                f"SELECT officer_id, reporter, budget_day, alert_type, groupUniqArray(alert_id) FROM {DELIVERY_TABLE} "
                "ARRAY JOIN reported_by AS reporter "
                "WHERE officer_id IN %(officers)s AND budget_day IN %(days)s AND reporter IN %(reporters)s "
                "AND alert_type IN %(types)s AND status IN %(immediate)s AND attempt > 0 AND digest_id = '' "
                "AND at >= %(since)s "
                "GROUP BY officer_id, reporter, budget_day, alert_type",
                parameters={
                    # An attempt comes after its alert's detection, which is on or after the officer's local budget
                    # day began (at most 14 h before that day's UTC midnight): two days' margin bounds the read to
                    # the months that can hold it (monthly partitions by `at`), on a server without statistics too.
                    "since": datetime.combine(min(k[2] for k in every), time.min, UTC) - timedelta(days=2),
                    "officers": tuple({k[0] for k in every}),
                    "reporters": tuple({k[1] for k in every}),
                    "days": tuple({k[2] for k in every}),
                    "types": tuple({t for _, types in kinds.values() for t in types}),
                    "immediate": IMMEDIATE_STATUSES,
                },
            ).result_rows
        found: dict[K, dict[BudgetKey, set[str]]] = {}
        for officer_id, reporter, day, alert_type, alert_ids in rows:
            key = (str(officer_id), str(reporter), day)
            for kind, (keys, types) in kinds.items():
                if key in keys and str(alert_type) in types:
                    found.setdefault(kind, {}).setdefault(key, set()).update(str(a) for a in alert_ids)
        return found

    def recipients_of(self, alert_ids: Collection[str]) -> dict[str, set[tuple[str, str, str]]]:
        """alert id -> the (officer, channel, route) it was delivered to, queued for or sent in a digest:
        whom a correction notice about that alert goes to. One query for all the ids."""
        if not alert_ids:
            return {}
        with self.lock:
            rows = self.client.query(
                f"SELECT DISTINCT alert_id, officer_id, channel, route FROM {DELIVERY_TABLE} "
                "WHERE alert_id IN %(alerts)s AND status IN %(final)s ORDER BY alert_id, officer_id, channel",
                parameters={"alerts": tuple(alert_ids), "final": FINAL_STATUSES},
            ).result_rows
        found: dict[str, set[tuple[str, str, str]]] = {}
        for alert_id, officer_id, channel, route in rows:
            found.setdefault(str(alert_id), set()).add((str(officer_id), str(channel), str(route)))
        return found

    def held_back(self, alert_ids: Collection[str], reason_prefix: str, detected_since: datetime | None) -> set[Key]:
        """(alert, officer, channel) of ``alert_ids`` queued for a digest with a reason beginning ``reason_prefix``
        (the delivery side's: held back by the immediate budget). One query for all the ids.

        ``detected_since``: the earliest detection of those alerts (None: unknown, every month is read). A row is
        written when its alert is delivered, after its detection: two days' margin (another worker's clock) bounds
        the read to the months that can hold it (monthly partitions by `at`), however long ago that was. Not "the
        last days": a correction may come weeks after its alert."""
        if not alert_ids:
            return set()
        parameters: dict[str, object] = {"alerts": tuple(alert_ids), "prefix": reason_prefix}
        if detected_since is not None:
            parameters["since"] = detected_since - timedelta(days=2)
        with self.lock:
            rows = self.client.query(
                f"SELECT DISTINCT alert_id, officer_id, channel FROM {DELIVERY_TABLE} "
                "WHERE alert_id IN %(alerts)s AND status = 'queued_digest' AND startsWith(reason, %(prefix)s)"
                + ("" if detected_since is None else " AND at >= %(since)s"),
                parameters=parameters,
            ).result_rows
        return {(str(a), str(o), str(c)) for a, o, c in rows}

    def gave_up(self, delivery: str, id_of: Callable[[str, str, str], str]) -> GaveUp | None:
        """The alert delivery with id ``delivery`` (``id_of(alert, officer, channel)``) whose latest try gave up.

        Ids are hashes of (alert, officer, channel), so the candidates are read and hashed here; there are
        few (deliveries that gave up are rare and each is a handful of rows). ``id_of`` is the delivery
        side's ``delivery_id``: how a delivery is named to receivers is not storage's to know.
        """
        with self.lock:
            rows = self.client.query(
                "SELECT alert_id, officer_id, channel, argMax(route, at), "
                "argMaxIf(alert_json, at, status = 'gave_up'), max(attempt), argMax(toString(status), (at, attempt)) "
                f"FROM {DELIVERY_TABLE} WHERE digest_id = '' GROUP BY alert_id, officer_id, channel "
                "HAVING countIf(status = 'gave_up') > 0",
            ).result_rows
        for alert_id, officer_id, channel, route, alert_json, attempts, last in rows:
            if id_of(str(alert_id), str(officer_id), str(channel)) == delivery:
                key = (str(alert_id), str(officer_id), str(channel))
                return GaveUp(key, str(route), str(alert_json), int(attempts), str(last))
        return None

    def pending_digests(self, now: datetime) -> list[QueuedAlert]:
        """Alerts queued for a digest (in the last ``digest_window``) and not sent in one yet."""
        with self.lock:
            rows = self.client.query(
                f"SELECT officer_id, channel, alert_id, argMaxIf(route, at, status = 'queued_digest'), "
                "argMaxIf(alert_json, at, status = 'queued_digest'), minIf(at, status = 'queued_digest') AS queued, "
                "argMaxIf(reason, at, status = 'queued_digest') "
                f"FROM {DELIVERY_TABLE} WHERE status IN ('queued_digest', 'digest_sent') AND at >= %(since)s "
                "GROUP BY officer_id, channel, alert_id "
                "HAVING countIf(status = 'digest_sent') = 0 AND countIf(status = 'queued_digest') > 0 "
                "ORDER BY officer_id, channel, queued",
                parameters={"since": now - self.digest_window},
            ).result_rows
        return [
            QueuedAlert(str(o), str(c), str(r), str(a), str(j), utc_aware(q), str(why))
            for o, c, a, r, j, q, why in rows
        ]

    def last_digests(self, now: datetime) -> dict[tuple[str, str], datetime]:
        """(officer, channel) -> when its latest digest was sent."""
        with self.lock:
            rows = self.client.query(
                f"SELECT officer_id, channel, max(at) FROM {DELIVERY_TABLE} "
                "WHERE status = 'digest_sent' AND at >= %(since)s GROUP BY officer_id, channel",
                parameters={"since": now - self.digest_window},
            ).result_rows
        return {(str(o), str(c)): utc_aware(at) for o, c, at in rows}
