"""Who may call the worker's ``/sql``: the checks, as a pure function of the request's headers.

A browser on the analyst's machine can reach ``127.0.0.1:6066`` (CSRF from any web page; DNS
rebinding makes a page's own host name point there). So the endpoint requires the per-start token
from ``DATA_DIR/web-token`` (a page cannot read it, and cannot set an Authorization header on a
cross-origin request without a CORS preflight nobody answers), a loopback (or configured) Host, no
Origin at all (the CLI sends none, every browser request does), and ``application/json``.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Mapping

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def host_name(host: str) -> str:
    """``Host`` header without its port: ``127.0.0.1:6066`` -> ``127.0.0.1``, ``[::1]:80`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def refuse_request(
    headers: Mapping[str, str], token: str | None, allowed_hosts: Collection[str] = ()
) -> tuple[int, str] | None:
    """``(status, reason)`` when the request must be refused, None when it may run."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if not token:
        return 403, "this worker serves no /sql endpoint (it was started without an access token)"
    host = host_name(lowered.get("host", ""))
    if host not in LOOPBACK_HOSTS and host not in {h.lower() for h in allowed_hosts}:
        return 403, "Host not allowed: add it to SYNTHWATCH_WEB_ALLOWED_HOSTS if this name is really this worker"
    if "origin" in lowered:
        return 403, "requests from web pages (with an Origin header) are refused"
    content_type = lowered.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        return 415, "Content-Type must be application/json"
    scheme, _, given = lowered.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return 401, "missing or wrong access token (Authorization: Bearer <DATA_DIR/web-token>)"
    return None
