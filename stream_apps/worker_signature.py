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

The key: ``SYNTHWATCH_WORKER_KEY`` (hex, every worker of a deployment the same); unset, a random key
kept in ``DATA_DIR/worker-key`` (0600) and made on first start, right for one worker or the embedded
stack.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from synthwatch.schemas.envelope import MIN_KEY_BYTES, Headers, _header, parse_key, sign

log = logging.getLogger("synthwatch.worker_signature")

HEADER = "synthwatch-worker-sig"


class WorkerSigner:
    """Signs what this worker produces for other workers and checks what it reads from them."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the worker key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:  # never the key
        return "WorkerSigner(<key>)"

    def headers(self, topic: str, key: bytes | None, value: bytes) -> list[tuple[str, bytes]]:
        """The header that proves a worker produced this record."""
        return [(HEADER, sign(self._key, topic, key, value))]

    def valid(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None) -> bool:
        """Whether ``headers`` carry this deployment's worker signature over the record."""
        signature = _header(headers, HEADER)
        return signature is not None and hmac.compare_digest(signature, sign(self._key, topic, key, value))

    def valid_event(self, event: Any) -> bool:
        """:meth:`valid` for a Faust event (its message's topic, key, value and headers)."""
        message = event.message
        return self.valid(message.topic, message.key, message.value, message.headers)


def worker_key(configured: str | None, data_dir: Path) -> bytes:
    """The configured key (hex), or this data directory's own, made on first use (0600)."""
    if configured:
        return parse_key(configured, "SYNTHWATCH_WORKER_KEY")
    path = data_dir / "worker-key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker on this data directory made it meanwhile
            pass
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32))
    return parse_key(path.read_text().strip(), str(path))
