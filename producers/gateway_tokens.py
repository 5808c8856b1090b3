"""Bearer tokens of the HTTP intake gateway: one or more per organisation, stored hashed, bound to what it may report.

Where they live: a JSON file (``SYNTHWATCH_GATEWAY_TOKENS_FILE``, default ``DATA_DIR/gateway-tokens.json``)
written 0600 and replaced atomically. Not a ClickHouse table: the embedded engine can be opened by one
process only (the worker holds it), and the gateway must keep accepting reports while ClickHouse is down
or being migrated; a file is also what a Kubernetes secret mounts. The gateway re-reads the file when it
changes, so ``synthwatch tokens revoke`` takes effect on the next request without a restart.

What is stored: SHA-256 of the token, never the token. A token is 32 random bytes (256 bits), so an
unsalted fast hash is enough: nobody can enumerate the token space to invert it, which is what salts and
slow KDFs defend against for human-chosen passwords. The lookup is by hash, so no token comparison leaks
timing about a stored secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from synthwatch.errors import SynthwatchError
from synthwatch.schemas.envelope import others_can_reach

#: Every token starts with this, so secret scanners (and people) recognise a leaked one.
TOKEN_PREFIX = "swg_"


class TokenStoreError(SynthwatchError, ValueError):
    """The tokens file cannot be used, or a token request makes no sense; the message says what to do."""


def token_hash(token: str) -> str:
    """Hex SHA-256 of a presented token: the only form in which tokens are stored or compared."""
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class GatewayToken:
    """One stored token: its public id, its hash, and the organisation, lab ids and agencies it may report as."""

    token_id: str
    sha256: str
    org_id: str
    lab_ids: tuple[str, ...]
    agencies: tuple[str, ...]
    created: str
    note: str = ""
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def permits(self, lab_id: str | None, agency: str | None) -> str | None:
        """None when this token may report as the record's lab or agency, else the reason to refuse."""
        if lab_id is not None and lab_id not in self.lab_ids:
            return (
                f"auth: not_permitted: the token of organisation {self.org_id!r} may not report as lab_id "
                f"{lab_id[:64]!r} (it may report as {', '.join(self.lab_ids) or 'no lab'})"
            )
        if agency is not None and agency not in self.agencies:
            return (
                f"auth: not_permitted: the token of organisation {self.org_id!r} may not report as agency "
                f"{agency[:64]!r} (it may report as {', '.join(self.agencies) or 'no agency'})"
            )
        return None

    def __repr__(self) -> str:  # never the hash either: it is the lookup key
        return f"GatewayToken({self.token_id!r}, org={self.org_id!r}, active={self.active})"


@dataclass
class TokenStore:
    """The tokens file, read into memory; ``reload_if_changed`` picks up revocations made by the CLI."""

    path: Path
    tokens: dict[str, GatewayToken] = field(default_factory=dict)  # by token_id
    _by_hash: dict[str, GatewayToken] = field(default_factory=dict)
    _stamp: tuple[int, int] | None = None

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        store = cls(path)
        store.reload_if_changed()
        return store

    def reload_if_changed(self) -> None:
        """Read the file again when its modification time or size changed (or it appeared/vanished)."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._set({}, None)
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._stamp:
            return
        if others_can_reach(info.st_mode):  # group read allowed: a Kubernetes Secret mount (deploy/k8s/gateway.yaml)
            raise TokenStoreError(
                f"{self.path} holds token hashes but other users can read or change it: run `chmod 600 {self.path}`"
            )
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            tokens = {
                entry["token_id"]: GatewayToken(
                    token_id=str(entry["token_id"]),
                    sha256=str(entry["sha256"]),
                    org_id=str(entry["org_id"]),
                    lab_ids=tuple(str(x) for x in entry.get("lab_ids", [])),
                    agencies=tuple(str(x) for x in entry.get("agencies", [])),
                    created=str(entry["created"]),
                    note=str(entry.get("note", "")),
                    revoked=None if entry.get("revoked") is None else str(entry["revoked"]),
                )
                for entry in data["tokens"]
            }
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TokenStoreError(
                f"cannot read the gateway tokens file {self.path}: {error!r}; restore it or create tokens anew"
            ) from error
        self._set(tokens, stamp)

    def _set(self, tokens: dict[str, GatewayToken], stamp: tuple[int, int] | None) -> None:
        self.tokens = tokens
        self._by_hash = {t.sha256: t for t in tokens.values() if t.active}
        self._stamp = stamp

    def authenticate(self, presented: str) -> GatewayToken | None:
        """The active token with this secret, or None."""
        return self._by_hash.get(token_hash(presented))

    def create(self, org_id: str, lab_ids: list[str], agencies: list[str], note: str = "") -> tuple[GatewayToken, str]:
        """Store a new token for ``org_id``; returns it with the secret, which is shown once and never stored."""
        if not org_id.strip():
            raise TokenStoreError("a token needs --org: the organisation it publishes for")
        if not lab_ids and not agencies:
            raise TokenStoreError("a token needs at least one --lab-id or --agency it may report as")
        self.reload_if_changed()
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = secrets.token_hex(4)
        while token_id in self.tokens:
            token_id = secrets.token_hex(4)
        token = GatewayToken(
            token_id=token_id,
            sha256=token_hash(secret),
            org_id=org_id,
            lab_ids=tuple(dict.fromkeys(lab_ids)),
            agencies=tuple(dict.fromkeys(agencies)),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            note=note,
        )
        self._write({**self.tokens, token_id: token})
        return token, secret

    def revoke(self, token_id: str) -> GatewayToken:
        """Mark a token revoked (kept in the list, so who had it stays on record)."""
        self.reload_if_changed()
        token = self.tokens.get(token_id)
        if token is None:
            raise TokenStoreError(f"no token with id {token_id[:32]!r}: `synthwatch tokens list` shows the ids")
        if token.active:
            revoked = GatewayToken(**{**asdict(token), "revoked": datetime.now(UTC).isoformat(timespec="seconds")})
            self._write({**self.tokens, token_id: revoked})
            return revoked
        return token

    def _write(self, tokens: dict[str, GatewayToken]) -> None:
        """Replace the file atomically, created 0600 (never readable by others, not even for an instant)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"tokens": [asdict(t) for t in tokens.values()]}, indent=2, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(prefix=".gateway-tokens-", dir=self.path.parent)  # mkstemp creates 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._stamp = None
        self.reload_if_changed()
