"""Signed envelopes: which organisation published an input record, proven by an HMAC in its Kafka headers.

Kafka tells a consumer nothing about the principal that produced a record, so broker authentication
alone cannot stop an authenticated lab from reporting as another lab's ``lab_id``. Each organisation
therefore holds a secret key; its publisher adds two headers to every record:

- ``synthwatch-org``: the organisation id;
- ``synthwatch-sig``: HMAC-SHA256 with the organisation's key over the topic, the record key and the
  record value (length-prefixed, so no field can absorb another).

The worker (:class:`EnvelopeVerifier`, pure and synchronous, used by the intake) recomputes the HMAC
and checks that the organisation may report as the event's ``lab_id`` (lab detections) or ``agency``
(border seizures). HMAC rather than Ed25519: ~1 µs a record against ~50 µs, and no new dependency; the
price is that the worker holds every key (it is trusted anyway: it is the only writer of alerts).
"""

from __future__ import annotations

import hashlib
import hmac
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from synthwatch.errors import SynthwatchError
from synthwatch.schemas.iso3166 import COUNTRIES
from synthwatch.schemas.text import first_forbidden

HEADER_ORG = "synthwatch-org"
HEADER_SIG = "synthwatch-sig"
_DOMAIN = b"synthwatch-envelope-v1\0"
MIN_KEY_BYTES = 16

#: Reject reasons start with one of these classes (``auth: <class>: details``): a fixed set of metric labels.
UNSIGNED = "unsigned"
UNKNOWN_ORG = "unknown_organisation"
BAD_SIGNATURE = "bad_signature"
NOT_PERMITTED = "not_permitted"
AUTH_CLASSES = (UNSIGNED, UNKNOWN_ORG, BAD_SIGNATURE, NOT_PERMITTED)

Headers = Sequence[tuple[str, bytes]] | Mapping[str, bytes]


class OrgKeysError(SynthwatchError, ValueError):
    """The organisation keys file cannot be used."""


_LENGTH = struct.Struct(">I").pack
_KEY_LENGTH = struct.Struct(">i").pack


def others_can_reach(mode: int) -> bool:
    """True when a secret file's mode lets users outside its group in, or its group change it.

    Group *read* stays allowed: Kubernetes mounts a Secret for a non-root user with group read (``fsGroup``),
    and the group is then the pod's own. One rule for every file holding keys or token hashes.
    """
    return bool(mode & (stat.S_IRWXO | stat.S_IWGRP))


def sign(secret: bytes, topic: str, key: bytes | None, value: bytes) -> bytes:
    """HMAC-SHA256 of (topic, key, value) under ``secret``; a missing key is signed as length -1.

    One call into OpenSSL's one-shot HMAC over the length-prefixed fields (the hot path of the intake).
    """
    topic_bytes = topic.encode()
    key_part = (_KEY_LENGTH(-1), b"") if key is None else (_KEY_LENGTH(len(key)), key)
    message = b"".join((_DOMAIN, _LENGTH(len(topic_bytes)), topic_bytes, *key_part, _LENGTH(len(value)), value))
    return hmac.digest(secret, message, hashlib.sha256)


def envelope_headers(
    org_id: str, secret: bytes, topic: str, key: bytes | None, value: bytes
) -> list[tuple[str, bytes]]:
    """The Kafka headers that prove ``org_id`` published this record."""
    return [(HEADER_ORG, org_id.encode()), (HEADER_SIG, sign(secret, topic, key, value))]


def parse_key(text: str, where: str) -> bytes:
    """A hex-encoded key of at least 16 bytes (``openssl rand -hex 32`` makes one)."""
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError as error:
        raise OrgKeysError(f"{where}: a key must be hex (make one with `openssl rand -hex 32`)") from error
    if len(secret) < MIN_KEY_BYTES:
        raise OrgKeysError(f"{where}: a key must have at least {MIN_KEY_BYTES} bytes ({2 * MIN_KEY_BYTES} hex digits)")
    return secret


@dataclass(frozen=True, slots=True)
class Organisation:
    """One publishing organisation: its keys (newest first; older ones accepted during a rotation), the lab ids
    and agencies it may report as, and the countries it may report for (empty: any)."""

    org_id: str
    keys: tuple[bytes, ...]
    lab_ids: frozenset[str]
    agencies: frozenset[str]
    countries: frozenset[str] = frozenset()

    def refusal(self, lab_id: str | None, agency: str | None, country: str | None) -> str | None:
        """None when the organisation may report as this lab or agency, for this country, else the reject reason:
        the same wherever it is judged (the worker's intake, the gateway, ``synthwatch publish``)."""
        if lab_id is not None and lab_id not in self.lab_ids:
            return auth_reason(NOT_PERMITTED, f"organisation {self.org_id!r} may not report as lab_id {lab_id[:64]!r}")
        if agency is not None and agency not in self.agencies:
            return auth_reason(NOT_PERMITTED, f"organisation {self.org_id!r} may not report as agency {agency[:64]!r}")
        return None if country is None else self.country_refusal(country)

    def country_refusal(self, country: str) -> str | None:
        """None when the organisation may report for ``country`` (or lists no countries), else the reject reason
        (``auth: not_permitted``), the same wherever it is judged (the worker's intake, the gateway)."""
        if not self.countries or country in self.countries:
            return None
        return auth_reason(
            NOT_PERMITTED,
            f"organisation {self.org_id!r} may not report for country {country[:8]!r} "
            f"(its countries: {', '.join(sorted(self.countries))})",
        )

    def __repr__(self) -> str:  # never the keys
        where = f", countries={sorted(self.countries)}" if self.countries else ""
        names = f"lab_ids={sorted(self.lab_ids)}, agencies={sorted(self.agencies)}"
        return f"Organisation({self.org_id!r}, {names}{where})"


def load_org_keys(path: Path) -> dict[str, Organisation]:
    """Read the organisation keys file (YAML), refusing one that other users can read.

    Format::

        organisations:
          lab-bamako:
            keys: ["<64 hex digits>"]   # newest first
            lab_ids: ["LNS-BKO"]
          douane-sn:
            keys: ["<64 hex digits>"]
            agencies: ["Douanes sénégalaises"]
            countries: [SN]             # optional: the countries it may report for (default: any)
    """
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise OrgKeysError(f"cannot read the organisation keys file {path}: {error.strerror}") from error
    if others_can_reach(mode):
        raise OrgKeysError(f"{path} holds secret keys but other users can read or change it: run `chmod 600 {path}`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise OrgKeysError(f"cannot read the organisation keys file {path}: {error}") from error
    except yaml.YAMLError as error:
        # The line and what is wrong, never the parser's quote of the line: that line may hold a key, and this
        # message goes to the worker's log and the terminal.
        mark = getattr(error, "context_mark", None) or getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        said = [str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part]
        raise OrgKeysError(f"{where}: not valid YAML: {', '.join(said) or type(error).__name__}") from None
    entries = data.get("organisations") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise OrgKeysError(f"{path}: expected a mapping `organisations: {{org_id: {{keys: [...], lab_ids: [...]}}}}`")
    orgs: dict[str, Organisation] = {}
    for org_id, entry in entries.items():
        where = f"{path}: organisation {org_id!r}"
        _refuse_unprintable(str(org_id), "its id", where)
        if not isinstance(entry, dict) or not isinstance(entry.get("keys"), list) or not entry["keys"]:
            raise OrgKeysError(f"{where}: needs `keys: [<hex key>, ...]`")
        lab_ids, agencies = _names(entry.get("lab_ids"), where), _names(entry.get("agencies"), where)
        if not lab_ids and not agencies:
            raise OrgKeysError(f"{where}: lists neither lab_ids nor agencies, so it could publish nothing")
        orgs[str(org_id)] = Organisation(
            org_id=str(org_id),
            keys=tuple(parse_key(str(key), where) for key in entry["keys"]),
            lab_ids=lab_ids,
            agencies=agencies,
            countries=_countries(entry.get("countries"), where),
        )
    _refuse_shared_reporters(path, orgs)
    return orgs


def _refuse_shared_reporters(path: Path, orgs: Mapping[str, Organisation]) -> None:
    """A lab id or agency is one organisation's: a report's claimed reporter names the organisation whose keys
    may sign it and which may correct it. Listed under two, either could sign, correct or squat the other's reports,
    and the reporter -> organisation map kept whichever came last in the file."""
    for kind, names_of in (("lab id", lambda org: org.lab_ids), ("agency", lambda org: org.agencies)):
        owner: dict[str, str] = {}
        for org in orgs.values():
            for name in sorted(names_of(org)):
                first = owner.setdefault(name, org.org_id)
                if first != org.org_id:
                    raise OrgKeysError(
                        f"{path}: {kind} {name!r} is listed under organisations {first!r} and {org.org_id!r}: a "
                        f"{kind} reports for one organisation (its keys sign its reports, it alone corrects them); "
                        "list it under one, or give each organisation its own"
                    )


def _countries(value: Any, where: str) -> frozenset[str]:
    """``countries: [ML, SN]``: ISO 3166-1 alpha-2 codes, upper case (YAML 1.1 reads a bare NO as false: quote it).

    A code that is no country (``UK`` for GB) is refused here: accepted, it refused every report of the
    organisation's real country at intake, one reject at a time, with a reason naming the typo only in passing.
    """
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c in _COUNTRY_CODES for c in value):
        raise OrgKeysError(f"{where}: countries is a list of ISO 3166-1 alpha-2 codes, e.g. [ML, SN] (quote 'NO')")
    return frozenset(value)


_COUNTRY_CODES = frozenset(COUNTRIES)


def _names(value: Any, where: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise OrgKeysError(f"{where}: lab_ids and agencies are lists of strings")
    for name in value:
        _refuse_unprintable(name, f"the name {name!r}", where)
    return frozenset(value)


def _refuse_unprintable(text: str, what: str, where: str) -> None:
    """Refuse a control, line-separator or bidi character in an organisation's id or reporter names.

    Why: the id names the organisation in budget notices, digests and webhook fields sent to other agencies, and
    in log lines; the wire contract refuses these characters in a report's names, so a lab id holding one could
    never match a report anyway. Whoever writes the keys file is trusted, a pasted or mistyped character is not.
    """
    refused = first_forbidden(text)
    if refused is not None:
        raise OrgKeysError(f"{where}: {what} holds {refused}: remove it (ids and names are shown to people)")


def _header(headers: Headers | None, name: str) -> bytes | None:
    if not headers:
        return None
    if isinstance(headers, Mapping):
        found = headers.get(name)
        return found if isinstance(found, bytes) else None
    for key, value in headers:
        if key == name:
            return value
    return None


def _shown(raw: bytes) -> str:
    """An organisation id from a header, safe to put in a reason (bounded, no control characters)."""
    text = raw[:64].decode("utf-8", errors="replace")
    return repr("".join(ch if ch.isprintable() else "?" for ch in text))


def auth_reason(kind: str, detail: str) -> str:
    return f"auth: {kind}: {detail}"


class EnvelopeVerifier:
    """Checks the signed envelope of input records; pure and synchronous (the intake's hot path).

    ``required``: a record without headers is refused; otherwise it passes unattributed (a record that
    does carry headers is always checked).
    """

    def __init__(self, orgs: Mapping[str, Organisation], required: bool = True) -> None:
        self.orgs = dict(orgs)
        self.required = required
        self._org_of = {f"lab:{lab}": org.org_id for org in self.orgs.values() for lab in org.lab_ids} | {
            f"agency:{agency}": org.org_id for org in self.orgs.values() for agency in org.agencies
        }

    @classmethod
    def from_file(cls, path: Path, required: bool = True) -> EnvelopeVerifier:
        return cls(load_org_keys(path), required)

    def check(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None
    ) -> tuple[str | None, str | None]:
        """(organisation id, None) for a valid signature, (None, None) for an allowed unsigned record,
        (None, reason) for a refused one."""
        raw_org = _header(headers, HEADER_ORG)
        signature = _header(headers, HEADER_SIG)
        if raw_org is None or signature is None:
            if self.required:
                return None, auth_reason(
                    UNSIGNED, f"no {HEADER_ORG}/{HEADER_SIG} headers (signed reports are required)"
                )
            return None, None
        org = self.orgs.get(raw_org.decode("utf-8", errors="replace"))
        if org is None:
            return None, auth_reason(UNKNOWN_ORG, f"{_shown(raw_org)} is not in the organisation keys file")
        for secret in org.keys:
            if hmac.compare_digest(sign(secret, topic, key, value), signature):
                return org.org_id, None
        return None, auth_reason(BAD_SIGNATURE, f"the signature is not {org.org_id!r}'s for this topic, key and value")

    def permits(self, org_id: str, lab_id: str | None, agency: str | None, country: str | None = None) -> str | None:
        """None when ``org_id`` may report as this lab or agency, for this country, else the reason to refuse.

        The country matters because alerts are routed by place: without ``countries`` in the keys file, any
        organisation's report may place a sample in any country, and its alerts go to that country's officers.
        """
        return self.orgs[org_id].refusal(lab_id, agency, country)

    def org_of(self, reporter: str) -> str | None:
        """The organisation allowed to report as ``lab:ID`` or ``agency:NAME`` (for evidence rebuilt
        from stored reports, which do not keep the signature)."""
        return self._org_of.get(reporter)


def auth_reason_class(reason: str) -> str | None:
    """``auth_<class>`` for an envelope reject reason, None for any other reason."""
    if not reason.startswith("auth: "):
        return None
    kind = reason[6:].split(":", 1)[0]
    return f"auth_{kind}" if kind in AUTH_CLASSES else "auth_other"
