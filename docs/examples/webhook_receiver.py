"""A synthwatch webhook receiver in plain Python (standard library only): verify, de-duplicate, accept.

Copy it, keep the ``verify`` function as it is, and replace ``handle_alert`` with what your system does
with an alert. Run it behind your HTTPS reverse proxy (it speaks plain HTTP on 127.0.0.1 by default):

    SECRET_BKO=... python webhook_receiver.py --port 8080 --secret-env ml-bko-douanes=SECRET_BKO

``--secret-env OFFICER=VARIABLE`` names the environment variable holding that officer's secret (the
``secret_env`` of their webhook in synthwatch's subscriptions file; give it twice for one officer while
rotating: either secret is accepted). Each request is answered:

    200  verified and new: handled
    401  no valid signature (forged, altered, or signed with another officer's secret)
    400  timestamp outside the tolerance window (a captured request replayed later), or the body's
         delivery_id/kind differ from the signed ones
    409  this delivery id was accepted before (a replay, or synthwatch retrying after a lost answer):
         synthwatch counts 409 as delivered
    413  body too large

One JSON line per request goes to stdout. The scheme is in docs/security.md ("Webhooks and delivery").
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PRINTING = threading.Lock()

TOLERANCE_S = 300  # a request signed more than 5 minutes away from our clock is refused
KEEP_IDS_S = 7 * 86400  # remember accepted delivery ids this long (at least TOLERANCE_S)
MAX_BODY = 1024 * 1024
DELIVERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
EVENT = re.compile(r"^[a-z_]{1,32}$")


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def verify(secrets: Iterable[str], headers: Mapping[str, str], body: bytes, now: float) -> dict[str, Any]:
    """Check signature (scheme v1), timestamp window and signed ids; return the payload or raise Rejected."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp, macs = None, []
    for item in lower.get("synthwatch-signature", "").split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            macs.append(value)
    delivery = lower.get("synthwatch-delivery-id", "")
    event = lower.get("synthwatch-event", "")
    if timestamp is None or not macs or not DELIVERY_ID.match(delivery) or not EVENT.match(event):
        raise Rejected(401, "missing or malformed signature headers")
    signed = f"{timestamp}.{delivery}.{event}.".encode() + body
    expected = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets if s]
    if not any(hmac.compare_digest(e, m) for e in expected for m in macs):
        raise Rejected(401, "bad signature")
    if abs(now - timestamp) > TOLERANCE_S:
        raise Rejected(400, f"timestamp {timestamp} outside the {TOLERANCE_S} s window")
    payload = json.loads(body)
    if not isinstance(payload, dict) or payload.get("delivery_id") != delivery or payload.get("kind") != event:
        raise Rejected(400, "body does not carry the signed delivery id and kind")
    return payload


class SeenIds:
    """Accepted delivery ids with their time; a real receiver keeps these in its database."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}
        self._lock = threading.Lock()

    def add_new(self, delivery: str, now: float) -> bool:
        with self._lock:
            for old in [k for k, at in self._at.items() if now - at > KEEP_IDS_S]:
                del self._at[old]
            if delivery in self._at:
                return False
            self._at[delivery] = now
            return True


def handle_alert(payload: dict[str, Any]) -> None:
    """Replace with your own processing (a ticket, a message to the duty officer, ...)."""


def make_handler(secrets: Mapping[str, list[str]], seen: SeenIds) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            declared = self.headers.get("Content-Length") or "0"
            # "-1" read until the sender hung up: unbounded, before any signature check. ASCII digits only:
            # str.isdigit() is also true of "²" (headers are read as Latin-1), which int() refuses with an error.
            if not (declared.isascii() and declared.isdigit()):
                self._answer(400, {"reason": "Content-Length must be a number of bytes"})
                return
            length = int(declared)
            if length > MAX_BODY:
                self._answer(413, {"reason": "body too large"})
                return
            body = self.rfile.read(length)
            now = time.time()
            try:
                try:  # which officer it claims to be for: only to pick the secret it must be signed with
                    claimed = json.loads(body).get("officer_id", "")
                except (ValueError, AttributeError):
                    raise Rejected(400, "body is not a JSON object") from None
                payload = verify(secrets.get(str(claimed), []), dict(self.headers.items()), body, now)
                if not seen.add_new(payload["delivery_id"], now):  # after verify: forgeries cannot burn ids
                    raise Rejected(409, "already received")
            except Rejected as error:
                self._answer(error.status, {"reason": error.reason})
                return
            handle_alert(payload)
            ids = {k: payload.get(k) for k in ("delivery_id", "kind", "officer_id", "alert_id", "digest_id")}
            self._answer(200, {**ids, "subject": payload.get("subject")})

        def _answer(self, status: int, record: dict[str, Any]) -> None:
            line = json.dumps({"status": status, **record}, ensure_ascii=False)
            with _PRINTING:  # one thread per request: print() writes text and newline apart, lines interleaved
                print(line, flush=True)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            self.wfile.write(str(record.get("reason", "ok")).encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one JSON line per request is printed by _answer

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--secret-env", action="append", default=[], metavar="OFFICER=VARIABLE")
    args = parser.parse_args(argv)
    secrets: dict[str, list[str]] = {}
    for item in args.secret_env:
        officer, _, variable = item.partition("=")
        value = os.environ.get(variable, "")
        if not officer or len(value) < 16:
            parser.error(f"--secret-env {item}: {variable} must hold the officer's secret (16+ characters)")
        secrets.setdefault(officer, []).append(value)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(secrets, SeenIds()))
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
