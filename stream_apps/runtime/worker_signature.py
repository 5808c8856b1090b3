"""Records workers produce for each other (alerts, sightings) carry a worker signature; readers check it.

Why: an alert on the alerts topic is stored and delivered to liaison officers, signed with their own
webhook secrets; a sighting on the sightings topic makes the novelty stage raise "never seen" alerts.
Anyone who could write to those topics could have an officer receive a forged critical alert (issue 12,
reproduced with a plain kafka-python producer). In production ACLs let only the worker principal write
them (deploy/kafka/acls.sh); the embedded broker cannot authenticate anyone (docs/security.md), and ACLs
are one control that a misconfiguration removes. So every alert and sighting a worker produces carries
an HMAC-SHA256 of (topic, key, value) under a key the workers share, and the agents that read them
refuse a record without a valid one (counted in ``synthwatch_forged_records_total``, logged, never
stored, never delivered).

The same holds for the detector state the worker writes to its tables' changelogs: a series record
carries the spike alerts its state decided (the outbox), which a restarted worker sends, under its own
signature. A record written there by anyone else would have been restored and its "outbox" sent as a
genuine alert. So state records are signed too, over (topic, partition, key, value), and recovery
restores only records with a valid signature (:func:`verified_changelog`).

The keys: ``SYNTHWATCH_WORKER_KEY`` (hex; several separated by commas, newest first) or
``SYNTHWATCH_WORKER_KEY_FILE`` (one hex key a line, newest first): the first key signs, every key is
accepted, so a rotation adds the new key in front, restarts every worker, and drops the old key once no
record signed with it is needed (alerts delivered, state rewritten: see docs/security.md). Every
worker of a deployment has the same keys. Unset, a random key kept in ``DATA_DIR/worker-key`` (0600)
and made on first start: right for one worker or the embedded stack only, so a worker told it is one
of several (``SYNTHWATCH_WORKERS`` above 1) refuses to start without configured keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from synthwatch.schemas.worker_keys import (
    HEADER,
    WorkerKeyError,
    WorkerSigner,
    settings_worker_keys,
    worker_key,
    worker_keys,
)

__all__ = [
    "HEADER",
    "WorkerKeyError",
    "WorkerSigner",
    "settings_worker_keys",
    "verified_changelog",
    "worker_key",
    "worker_keys",
]


def verified_changelog(
    apply: Callable[[list[Any]], None], signer: WorkerSigner, refused: Callable[[list[Any]], None]
) -> Callable[[Iterable[Any]], None]:
    """Wrap a table's ``apply_changelog_batch``: only records a worker signed are restored.

    Why: restored state is trusted (its outbox is sent as alerts under the worker's signature).
    ``refused`` gets the others (to count and log them); a forged deletion (no value) is refused too.
    """

    def apply_verified(batch: Iterable[Any]) -> None:
        kept: list[Any] = []
        bad: list[Any] = []
        for event in batch:
            (kept if signer.valid_state_record(event) else bad).append(event)
        if bad:
            refused(bad)
        apply(kept)

    return apply_verified
