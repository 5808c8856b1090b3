"""What one sending attempt achieved, on any channel: the delivery service decides on retries from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one attempt achieved; ``code`` is the HTTP status or SMTP reply code, when one came."""

    ok: bool
    code: int | None
    reason: str
    retryable: bool = False
