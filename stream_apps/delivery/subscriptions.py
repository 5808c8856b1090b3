"""Who receives which alert: liaison officers' subscriptions (a YAML file) and the routing rule.

Each officer has routes; a route is filters plus a channel. An officer receives an alert when at least
one of their routes matches it. Within a route every filter that is set must match (a list matches when
any of its items does); an unset filter matches everything. Network-wide alerts (spread) have no region:
they are about the regions they list in ``details["regions"]``, so a Bamako route hears of a spread that
includes Bamako.

Immediate or digest: an alert at or above the route's ``immediate_min_severity`` (default: the officer's)
is sent at once on that route's channel; an officer whose matching routes are all below their threshold
gets the alert once, in the daily digest, on the channel of the first matching route. Two matching routes
on the same channel give one message, never two.

Errors name the place to fix: ``file:line: officers[0].routes[1].min_severity: message``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from synthwatch.catalogue import Family
from synthwatch.errors import SynthwatchError
from synthwatch.redaction import redact_url
from synthwatch.schemas import Alert
from synthwatch.schemas.envelope import others_can_reach
from synthwatch.schemas.events import CountryCode, RegionCode
from synthwatch.schemas.records import AlertType, Severity
from synthwatch.stream_apps.delivery.targets import TargetPolicy, in_clear, parse_networks
from synthwatch.stream_apps.delivery.webhook import MIN_SECRET_LENGTH

Language = Literal["en", "fr", "ar"]
"""Languages the message templates exist in (``stream_apps/delivery/templates/<language>/``)."""

SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}

Identifier = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
"""Lower-case id (officer, route, channel name): it is stored with every delivery attempt."""

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]

_EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")


def severity_at_least(severity: str, minimum: str) -> bool:
    return SEVERITY_RANK[severity] >= SEVERITY_RANK[minimum]


def _http_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value.strip()


def _email(value: str) -> str:
    if not _EMAIL.match(value.strip()):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value.strip()


def _one_or_many(value: Any) -> Any:
    """``to: a@b.ml`` is as natural as a list of one."""
    return [value] if isinstance(value, str) else value


def _clock_time(value: Any) -> Any:
    """``7:30`` and ``07:30`` both mean half past seven (pydantic alone wants two-digit hours)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*", value)
        if match is None or int(match.group(1)) > 23 or int(match.group(2)) > 59:
            raise ValueError(f"{value!r} is not a time of day (HH:MM, e.g. 07:30)")
        return time(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
    return value


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone (e.g. 'Africa/Bamako', 'Europe/Paris')") from None
    return value


class WebhookChannel(BaseModel):
    """JSON POST signed with HMAC-SHA256 under this subscriber's own secret (never shared with another).

    A shared secret would let every agency holding it sign alerts for the others, so each webhook
    names its own: ``secret_env`` (an environment variable; preferred) or ``secret`` (in the file).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["webhook"]
    name: Identifier = Field(default="webhook", description="Deliveries are recorded and deduplicated per name.")
    url: Annotated[str, AfterValidator(_http_url)]
    secret: SecretStr | None = Field(default=None, description="Prefer secret_env: files get copied around.")
    secret_env: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = Field(
        default=None, description="Environment variable holding the secret."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=120)

    @model_validator(mode="after")
    def _own_secret(self) -> WebhookChannel:
        if self.secret is None and self.secret_env is None:
            raise ValueError(
                "a webhook needs its own secret: set secret_env (an environment variable holding at least "
                f"{MIN_SECRET_LENGTH} random characters, e.g. from `openssl rand -hex 32`)"
            )
        if self.secret is not None and self.secret_env is not None:
            raise ValueError("give either secret or secret_env, not both")
        if self.secret is not None and len(self.secret.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"secret is shorter than {MIN_SECRET_LENGTH} characters: use `openssl rand -hex 32`")
        return self

    @property
    def target(self) -> str:
        """Where it goes, for the record: no query string (it may carry a token), no password."""
        parts = urlsplit(self.url)
        return redact_url(f"{parts.scheme}://{parts.netloc}{parts.path}")

    @property
    def endpoint(self) -> str:
        """The receiving server (scheme, host, port): concurrency limits and circuit breakers are per endpoint."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The secret's value: from the file, or from the environment variable (None when unset)."""
        if self.secret is not None:
            return self.secret.get_secret_value()
        if self.secret_env:
            return (os.environ if environ is None else environ).get(self.secret_env) or None
        return None


class EmailChannel(BaseModel):
    """E-mail (plain text and HTML) through the SMTP server of the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["email"]
    name: Identifier = Field(default="email", description="Deliveries are recorded and deduplicated per name.")
    to: Annotated[tuple[Annotated[str, AfterValidator(_email)], ...], BeforeValidator(_one_or_many)] = Field(
        min_length=1
    )
    timeout_s: float = Field(default=30.0, gt=0, le=300)

    @property
    def target(self) -> str:
        return ", ".join(self.to)


Channel = Annotated[WebhookChannel | EmailChannel, Field(discriminator="type")]


class Route(BaseModel):
    """Filters (all that are set must match) and the channel an alert takes when they do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier | None = Field(default=None, description="Default: route-1, route-2 ... in file order.")
    countries: tuple[CountryCode, ...] = ()
    regions: tuple[RegionCode, ...] = ()
    families: tuple[Family, ...] = ()
    substances: tuple[Text, ...] = Field(default=(), description="Names, substance keys or InChIKeys.")
    alert_types: tuple[AlertType, ...] = ()
    min_severity: Severity = Field(default="info", description="Below this, the route ignores the alert.")
    immediate_min_severity: Severity | None = Field(
        default=None, description="Below this (default: the officer's), matching alerts go to the digest."
    )
    channel: Channel

    def _follows_up(self, alert: Alert) -> bool:
        """An ``identified`` alert goes where new substances go: it replaces (or follows) a new-substance alert."""
        return alert.alert_type == "identified" and "new_substance" in self.alert_types

    def matches(self, alert: Alert) -> bool:
        """Does this route want this alert (severity, type, family, substance and place filters)?"""
        if not severity_at_least(alert.severity, self.min_severity):
            return False
        if self.alert_types and alert.alert_type not in self.alert_types and not self._follows_up(alert):
            return False
        if self.families and alert.substance.family not in self.families:
            return False
        if self.substances and not substance_names(alert) & {s.casefold() for s in self.substances}:
            return False
        countries, regions = alert_places(alert)
        if self.countries and countries.isdisjoint(self.countries):
            return False
        return not (self.regions and regions.isdisjoint(self.regions))


class Officer(BaseModel):
    """A liaison officer: who, which language, when the digest comes, and their routes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Identifier
    name: Text
    organisation: Text | None = None
    language: Language
    timezone: Annotated[str, AfterValidator(_zone)] = "UTC"
    digest_time: Annotated[time, BeforeValidator(_clock_time)] = Field(
        default=time(7, 0), description="Local time of the daily digest (HH:MM)."
    )
    immediate_min_severity: Severity = Field(
        default="warning", description="Alerts below this go to the daily digest instead of out at once."
    )
    routes: tuple[Route, ...] = Field(min_length=1)

    @field_validator("routes")
    @classmethod
    def _route_names(cls, routes: tuple[Route, ...]) -> tuple[Route, ...]:
        """Every route has a name: it is stored with each delivery so people can tell routes apart."""
        return tuple(r if r.name else r.model_copy(update={"name": f"route-{i + 1}"}) for i, r in enumerate(routes))

    @model_validator(mode="after")
    def _consistent(self) -> Officer:
        names = [r.name for r in self.routes]
        duplicated = sorted({n for n in names if n is not None and names.count(n) > 1})
        if duplicated:
            raise ValueError(f"route names must be unique; repeated: {', '.join(duplicated)}")
        channels: dict[str, Any] = {}
        for route in self.routes:
            known = channels.setdefault(route.channel.name, route.channel)
            if known != route.channel:
                raise ValueError(
                    f"two different channels are both named {route.channel.name!r}; give them distinct `name`s "
                    "(deliveries are deduplicated per channel name)"
                )
        return self

    def channels(self) -> dict[str, WebhookChannel | EmailChannel]:
        """The officer's channels by name, in route order."""
        found: dict[str, WebhookChannel | EmailChannel] = {}
        for route in self.routes:
            found.setdefault(route.channel.name, route.channel)
        return found

    def immediate_threshold(self, route: Route) -> str:
        return route.immediate_min_severity or self.immediate_min_severity

    def local_day(self, now: datetime) -> date:
        return now.astimezone(ZoneInfo(self.timezone)).date()

    def digest_moment(self, now: datetime) -> datetime:
        """Today's digest time (in the officer's zone) as a UTC instant."""
        zone = ZoneInfo(self.timezone)
        moment = datetime.combine(self.local_day(now), self.digest_time, tzinfo=zone)
        return moment.astimezone(UTC)

    def next_digest(self, now: datetime) -> datetime:
        moment = self.digest_moment(now)
        return moment if moment > now else self.digest_moment(now + timedelta(days=1))


class Subscriptions(BaseModel):
    """The whole file: a list of officers with unique ids, and networks webhooks may reach on purpose."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook_allowed_networks: tuple[str, ...] = Field(
        default=(),
        description="Non-public networks (CIDR) webhooks may reach, e.g. [10.20.0.0/16]; "
        "loopback, link-local and private addresses are refused otherwise.",
    )
    officers: tuple[Officer, ...] = ()

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        parse_networks(values)
        return values

    @model_validator(mode="after")
    def _unique_ids(self) -> Subscriptions:
        ids = [o.id for o in self.officers]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"officer ids must be unique; repeated: {', '.join(duplicated)}")
        return self

    def target_policy(self, *extra: Sequence[str]) -> TargetPolicy:
        """Public addresses plus this file's allowed networks (and ``extra``, e.g. from settings)."""
        return TargetPolicy.of(self.webhook_allowed_networks, *extra)

    def webhooks(self) -> Iterator[tuple[int, int, Officer, WebhookChannel]]:
        """(officer index, route index, officer, channel) of every webhook route, in file order."""
        for i, officer in enumerate(self.officers):
            for j, route in enumerate(officer.routes):
                if isinstance(route.channel, WebhookChannel):
                    yield i, j, officer, route.channel

    def officer(self, officer_id: str) -> Officer | None:
        return next((o for o in self.officers if o.id == officer_id), None)


# --- routing ---------------------------------------------------------------------------------------------


def alert_places(alert: Alert) -> tuple[frozenset[str], frozenset[str]]:
    """(countries, regions) an alert is about; a network-wide alert is about the regions it lists."""
    if alert.region:
        regions = {alert.region}
    else:
        listed = alert.details.get("regions", [])
        regions = {r for r in listed if isinstance(r, str)} if isinstance(listed, list) else set()
    countries = {r.split("-", 1)[0] for r in regions}
    if alert.country:
        countries.add(alert.country)
    return frozenset(countries), frozenset(regions)


def substance_names(alert: Alert) -> set[str]:
    """What a ``substances`` filter item may equal (case-insensitive): name, key, InChIKey or its first block."""
    s = alert.substance
    names = {s.name, s.key}
    if s.inchikey:
        names |= {s.inchikey, s.inchikey.split("-", 1)[0]}
    if s.key.startswith("name:"):
        names.add(s.key[5:])
    return {n.casefold() for n in names}


@dataclass(frozen=True, slots=True)
class Recipient:
    """One message to send: an officer, the route that chose it, its channel, and now or in the digest."""

    officer: Officer
    route: Route
    channel: WebhookChannel | EmailChannel
    immediate: bool

    def key(self, alert_id: str) -> tuple[str, str, str]:
        """What is delivered at most once: (alert, officer, channel name)."""
        return (alert_id, self.officer.id, self.channel.name)


def recipients(alert: Alert, subscriptions: Subscriptions) -> list[Recipient]:
    """Everyone who receives ``alert``, each channel once; see the module docstring for the rule."""
    found: list[Recipient] = []
    for officer in subscriptions.officers:
        matching = [route for route in officer.routes if route.matches(alert)]
        if not matching:
            continue
        immediate = [r for r in matching if severity_at_least(alert.severity, officer.immediate_threshold(r))]
        if not immediate:
            found.append(Recipient(officer, matching[0], matching[0].channel, immediate=False))
            continue
        channels: set[str] = set()
        for route in immediate:
            if route.channel.name not in channels:
                channels.add(route.channel.name)
                found.append(Recipient(officer, route, route.channel, immediate=True))
    return found


# --- loading ---------------------------------------------------------------------------------------------


class SubscriptionsError(SynthwatchError, ValueError):
    """The file is not valid; ``problems`` holds one ``file:line: field: message`` per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: ``NO`` (Norway) and ``on`` stay strings, ``7:30`` is not the number 450."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"), list("-+0123456789.")
)


def _walk(node: yaml.Node, path: str = "") -> Iterator[tuple[str, yaml.Node]]:
    yield path, node
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _walk(value, f"{path}.{key.value}" if path else str(key.value))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _walk(item, f"{path}[{index}]")


def _duplicate_keys(root: yaml.Node, source: str) -> list[tuple[int, str]]:
    """PyYAML keeps the last of two equal keys silently; a second ``routes:`` must not hide the first."""
    problems: list[tuple[int, str]] = []
    for path, node in _walk(root):
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key, _ in node.value:
                if key.value in seen:
                    field = f"{path}.{key.value}" if path else str(key.value)
                    line = key.start_mark.line + 1
                    problems.append((line, f"{source}:{line}: {field}: key given twice"))
                seen.add(key.value)
    return problems


def _duplicate_ids(root: yaml.Node, source: str) -> list[tuple[int, str]]:
    """A repeated officer id, at the line of its second use (deliveries are recorded per officer id)."""
    officers = (
        next((v for k, v in root.value if k.value == "officers"), None) if isinstance(root, yaml.MappingNode) else None
    )
    if not isinstance(officers, yaml.SequenceNode):
        return []
    first: dict[str, int] = {}
    problems = []
    for index, officer in enumerate(officers.value):
        if not isinstance(officer, yaml.MappingNode):
            continue
        node = next((v for k, v in officer.value if k.value == "id"), None)
        if not isinstance(node, yaml.ScalarNode):
            continue
        line = node.start_mark.line + 1
        if node.value in first:
            message = f"officer id {node.value!r} is already used at line {first[node.value]}"
            problems.append((line, f"{source}:{line}: officers[{index}].id: {message}"))
        else:
            first[node.value] = line
    return problems


def _locate(root: yaml.Node, loc: tuple[int | str, ...]) -> tuple[int, str]:
    """Line (1-based) and dotted field path of a pydantic error location in the YAML tree.

    A missing field points at the mapping that lacks it; union tags (``webhook``) are skipped.
    """
    node, path = root, ""
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node, path = node.value[part], f"{path}[{part}]"
            continue
        if isinstance(node, yaml.MappingNode):
            values = {str(k.value): v for k, v in node.value}
            if str(part) in values:
                node, path = values[str(part)], f"{path}.{part}" if path else str(part)
                continue
            tag = values.get("type")
            if isinstance(tag, yaml.ScalarNode) and tag.value == part:
                continue  # discriminated union: pydantic names the chosen member
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else str(part)
    return node.start_mark.line + 1, path


def _message(error: Any) -> str:
    if error["type"] == "too_short":
        return f"needs at least {error.get('ctx', {}).get('min_length', 1)} item(s)"
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _webhook_problems(
    subscriptions: Subscriptions, root: yaml.Node, source: str, allowed: Sequence[str]
) -> list[tuple[int, str]]:
    """Secrets shared between officers, and webhook URLs that are loopback/private and not allowed."""
    problems: list[tuple[int, str]] = []
    owners: dict[str, tuple[str, int]] = {}  # secret_env name or secret digest -> (officer, line)
    policy = subscriptions.target_policy(allowed)
    for i, j, officer, channel in subscriptions.webhooks():
        where = ("officers", i, "routes", j, "channel")
        field, token = (
            ("secret_env", f"env:{channel.secret_env}")
            if channel.secret_env
            else ("secret", "value:" + hashlib.sha256(channel.secret.get_secret_value().encode()).hexdigest())
            if channel.secret is not None
            else ("", "")
        )
        if token:
            line, path = _locate(root, (*where, field))
            owner = owners.setdefault(token, (officer.id, line))
            if owner[0] != officer.id:
                problems.append(
                    (
                        line,
                        f"{source}:{line}: {path}: officer {officer.id} uses the same webhook secret as officer "
                        f"{owner[0]} (line {owner[1]}): each subscriber needs its own, or one could sign "
                        "alerts for the other",
                    )
                )
        refused = policy.literal_refusal(urlsplit(channel.url).hostname or "", plain=in_clear(channel.url))
        if refused is not None:
            line, path = _locate(root, (*where, "url"))
            problems.append((line, f"{source}:{line}: {path}: {refused}"))
    return problems


def secret_problems(subscriptions: Subscriptions, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Webhooks whose secret cannot be used here: ``"officer/channel" -> why`` (unset, short, or shared).

    The file check catches the same variable named twice; this one catches two variables holding
    the same value, which only the environment shows. The worker refuses to send on these channels.
    """
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    owners: dict[str, str] = {}
    for _, _, officer, channel in subscriptions.webhooks():
        key = f"{officer.id}/{channel.name}"
        value = channel.resolve_secret(environ)
        if value is None:
            found[key] = f"environment variable {channel.secret_env} is not set: the webhook has no secret"
            continue
        if len(value) < MIN_SECRET_LENGTH:
            found[key] = f"the secret in {channel.secret_env} is shorter than {MIN_SECRET_LENGTH} characters"
            continue
        digest = hashlib.sha256(value.encode()).hexdigest()
        owner = owners.setdefault(digest, officer.id)
        if owner != officer.id:
            found[key] = f"its secret has the same value as officer {owner}'s: each subscriber needs its own"
    return found


def parse_subscriptions(
    text: str, source: str = "<subscriptions>", allowed_networks: Sequence[str] = ()
) -> Subscriptions:
    """Validate a subscriptions document; raises :class:`SubscriptionsError` naming lines and fields.

    ``allowed_networks``: networks webhooks may reach besides public ones, from settings (the file
    may add its own with ``webhook_allowed_networks``).
    """
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise SubscriptionsError([f"{source}:{line}: not valid YAML: {error.problem or error}"]) from None
    if root is None:
        return Subscriptions()
    problems = _duplicate_keys(root, source) + _duplicate_ids(root, source)
    loader = _Loader("")
    try:
        data = loader.construct_document(root)
    finally:
        loader.dispose()
    subscriptions: Subscriptions | None = None
    try:
        subscriptions = Subscriptions.model_validate(data)
    except ValidationError as error:
        errors = error.errors(include_url=False)
        for item in errors:
            loc = tuple(item["loc"])
            if loc == () and "officer ids must be unique" in str(item["msg"]):
                continue  # reported by _duplicate_ids, at the line of the repeated id
            if item["type"] == "too_short" and any(
                len(e["loc"]) > len(loc) and e["loc"][: len(loc)] == loc for e in errors
            ):
                continue  # "no routes left" only because a route was invalid: that route's own error says why
            line, path = _locate(root, loc)
            problems.append((line, f"{source}:{line}: {path or '(document)'}: {_message(item)}"))
    if subscriptions is not None:
        problems += _webhook_problems(subscriptions, root, source, allowed_networks)
    if problems or subscriptions is None:
        raise SubscriptionsError([text for _, text in sorted(problems, key=lambda p: p[0])])
    return subscriptions


def readable_secrets(path: Path | str, subscriptions: Subscriptions) -> str | None:
    """Why the file's literal webhook secrets are exposed (other users may read or change the file), or None.

    A warning, not a refusal: a file without literal secrets (``secret_env``) may be world-readable, as a
    Kubernetes ConfigMap is; one with them holds what signs alerts for its officers, like the keys files that
    are refused when others can read them.
    """
    literal = [f"{officer.id}/{channel.name}" for _, _, officer, channel in subscriptions.webhooks() if channel.secret]
    if not literal:
        return None
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if not others_can_reach(mode):
        return None
    return (
        f"{path} holds webhook secrets ({', '.join(sorted(set(literal)))}) but other users can read or change it: "
        f"`chmod 600 {path}`, or move the secrets to secret_env variables"
    )


def load_subscriptions(path: Path | str, allowed_networks: Sequence[str] = ()) -> Subscriptions:
    """Read and validate a subscriptions file (see ``deploy/subscriptions.example.yaml``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SubscriptionsError([f"{path}: cannot read: {error.strerror or error}"]) from None
    return parse_subscriptions(text, source=str(path), allowed_networks=allowed_networks)
