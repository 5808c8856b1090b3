"""Subscriptions: the file is validated with errors a person can act on, and routing is exactly the rule.

The routing property (hypothesis): an officer receives an alert exactly when one of their routes matches,
checked against an oracle written independently from the raw filter data, never from the models.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given, settings
from hypothesis import strategies as st

from synthwatch.schemas import Alert
from synthwatch.stream_apps.delivery.subscriptions import (
    Subscriptions,
    SubscriptionsError,
    alert_places,
    load_subscriptions,
    parse_subscriptions,
    recipients,
    secret_problems,
)
from synthwatch.stream_apps.delivery.targets import TargetPolicy
from synthwatch.stream_apps.delivery.webhook import GuardedResolver, TargetRefused
from tests.support.delivery_helpers import make_alert

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "subscriptions.example.yaml"


def test_example_file_is_valid_and_covers_four_cities_in_both_languages() -> None:
    subscriptions = load_subscriptions(EXAMPLE)
    ids = [o.id for o in subscriptions.officers]
    assert all(any(i.startswith(city) for i in ids) for city in ("ml-bko", "ma-rab", "sn-dk", "fr-75"))
    assert {o.language for o in subscriptions.officers} == {"en", "fr"}
    assert {r.channel.type for o in subscriptions.officers for r in o.routes} == {"webhook", "email"}
    assert all(r.name for o in subscriptions.officers for r in o.routes)


def test_a_new_nitazene_in_bamako_reaches_the_bamako_officer_in_french_at_once() -> None:
    subscriptions = load_subscriptions(EXAMPLE)
    found = recipients(make_alert(), subscriptions)
    bamako = [r for r in found if r.officer.id == "ml-bko-douanes"]
    assert {(r.channel.type, r.immediate) for r in bamako} == {("webhook", True), ("email", True)}
    assert all(r.officer.language == "fr" for r in bamako)
    assert "sn-dk-sante" not in {r.officer.id for r in found}  # Senegal only


BROKEN = """\
officers:
  - id: ml-bko-douanes
    name: Kadiatou Diallo
    language: fr
    routes:
      - name: opioides
        countries: [ML]
        families: [nitazene, fentanil]
        min_severity: urgent
        channel: {type: webhook, url: "ftp://douanes.ml/hook"}
      - regions: [ML-ZZZ]
        channel:
          type: email
  - id: fr-paris
    name: Julien Martin
    language: de
    timezone: Europe/Lyon
    routes:
      - countrys: [FR]
        channel: {type: email, to: "not-an-address"}
"""


def test_errors_name_the_file_line_and_field() -> None:
    with pytest.raises(SubscriptionsError) as caught:
        parse_subscriptions(BROKEN, source="subs.yaml")
    problems = caught.value.problems
    expected = [
        ("subs.yaml:8: officers[0].routes[0].families[1]:", "'nitazene'"),
        ("subs.yaml:9: officers[0].routes[0].min_severity:", "'critical'"),
        ("subs.yaml:10: officers[0].routes[0].channel.url:", "not an http(s) URL"),
        ("subs.yaml:11: officers[0].routes[1].regions[0]:", "ISO 3166-2"),
        ("subs.yaml:13: officers[0].routes[1].channel.to:", "Field required"),
        ("subs.yaml:16: officers[1].language:", "'en', 'fr' or 'ar'"),
        ("subs.yaml:17: officers[1].timezone:", "IANA time zone"),
        ("subs.yaml:19: officers[1].routes[0].countrys:", "Extra inputs are not permitted"),
        ("subs.yaml:20: officers[1].routes[0].channel.to[0]:", "not an e-mail address"),
    ]
    for prefix, fragment in expected:
        assert any(p.startswith(prefix) and fragment in p for p in problems), (prefix, problems)
    assert len(problems) == len(expected), problems
    assert str(caught.value).splitlines() == problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("officers:\n  - id: [oops\n", "f.yaml:3: not valid YAML"),
        ("- just a list\n", "f.yaml:1: (document): Input should be a valid dictionary"),
        (
            "officers:\n  - id: a\n    name: A\n    language: en\n    language: fr\n    routes:\n"
            "      - channel: {type: email, to: a@b.org}\n",
            "f.yaml:5: officers[0].language: key given twice",
        ),
        (
            "officers:\n  - {id: a, name: A, language: en, routes: [{channel: {type: email, to: a@b.org}}]}\n"
            "  - {id: a, name: B, language: fr, routes: [{channel: {type: email, to: b@b.org}}]}\n",
            "f.yaml:3: officers[1].id: officer id 'a' is already used at line 2",
        ),
        (
            "officers:\n  - id: a\n    name: A\n    language: en\n    routes: []\n",
            "f.yaml:5: officers[0].routes: needs at least 1 item(s)",
        ),
        (
            "officers:\n  - id: a\n    name: A\n    language: en\n    routes:\n"
            "      - channel: {type: webhook, url: 'http://a/1', secret_env: S1}\n"
            "      - channel: {type: webhook, url: 'http://a/2', secret_env: S1}\n",
            "f.yaml:2: officers[0]: two different channels are both named 'webhook'",
        ),
        (
            "officers:\n  - id: a\n    name: A\n    language: en\n    routes:\n"
            "      - channel: {type: sms, to: '+223'}\n",
            "f.yaml:6: officers[0].routes[0].channel: Input tag 'sms'",
        ),
        (
            "officers:\n  - id: Not An Id\n    name: A\n    language: en\n",
            "f.yaml:2: officers[0].id: String should match",
        ),
    ],
)
def test_each_kind_of_mistake_is_reported_where_it_is(text: str, expected: str) -> None:
    with pytest.raises(SubscriptionsError) as caught:
        parse_subscriptions(text, source="f.yaml")
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SubscriptionsError, match=r"nope\.yaml: cannot read"):
        load_subscriptions(tmp_path / "nope.yaml")


def test_yaml_1_1_traps_are_defused() -> None:
    """Norway's code is not False and 7:30 is not the number 450."""
    subscriptions = parse_subscriptions(
        "officers:\n  - id: no-oslo\n    name: Ola\n    language: en\n    digest_time: 7:30\n"
        "    routes:\n      - countries: [NO, ML]\n        channel: {type: email, to: ola@politiet.no}\n"
    )
    officer = subscriptions.officers[0]
    assert officer.routes[0].countries == ("NO", "ML")
    assert officer.digest_time == time(7, 30)
    assert officer.routes[0].name == "route-1"


def test_digest_time_is_local_to_the_officer() -> None:
    officer = parse_subscriptions(
        "officers:\n  - id: p\n    name: P\n    language: fr\n    timezone: Europe/Paris\n    digest_time: '08:00'\n"
        "    routes: [{channel: {type: email, to: p@x.fr}}]\n"
    ).officers[0]
    assert officer.digest_moment(datetime(2026, 1, 15, 12, tzinfo=UTC)) == datetime(2026, 1, 15, 7, tzinfo=UTC)
    assert officer.digest_moment(datetime(2026, 7, 15, 12, tzinfo=UTC)) == datetime(2026, 7, 15, 6, tzinfo=UTC)
    assert officer.next_digest(datetime(2026, 7, 15, 12, tzinfo=UTC)) == datetime(2026, 7, 16, 6, tzinfo=UTC)


def test_network_wide_alerts_are_about_the_regions_they_list() -> None:
    spread = make_alert(
        alert_type="spread", country=None, region=None, details={"regions": ["SN-DK", "MA-CAS"]}, severity="critical"
    )
    assert alert_places(spread) == (frozenset({"SN", "MA"}), frozenset({"SN-DK", "MA-CAS"}))
    subscriptions = parse_subscriptions(
        "officers:\n"
        "  - {id: dakar, name: D, language: fr, routes: [{regions: [SN-DK], channel: {type: email, to: d@x.sn}}]}\n"
        "  - {id: bamako, name: B, language: fr, routes: [{countries: [ML], channel: {type: email, to: b@x.ml}}]}\n"
    )
    assert [r.officer.id for r in recipients(spread, subscriptions)] == ["dakar"]


def test_substance_filter_takes_names_keys_and_inchikeys_in_any_case() -> None:
    alert = make_alert()
    for item in ("pentyloxynitazene", "QWERTYUIOPASDF", "qwertyuiopasdf-uhfffaoysa-n"):
        subscriptions = parse_subscriptions(
            f"officers:\n  - {{id: a, name: A, language: en, routes: [{{substances: ['{item}'], "
            "channel: {type: email, to: a@b.org}}]}\n"
        )
        assert len(recipients(alert, subscriptions)) == 1, item


def test_two_matching_routes_on_one_channel_send_once_and_digest_only_when_nothing_is_immediate() -> None:
    subscriptions = parse_subscriptions(
        "officers:\n  - id: a\n    name: A\n    language: en\n    routes:\n"
        "      - {name: mali, countries: [ML], channel: {type: email, to: a@b.org}}\n"
        "      - {name: opioids, families: [nitazene], channel: {type: email, to: a@b.org}}\n"
        "      - {name: low, countries: [ML], immediate_min_severity: critical, "
        "channel: {type: webhook, name: hook, url: 'http://h/1', secret_env: HOOK_SECRET}}\n"
    )
    critical = recipients(make_alert(severity="critical"), subscriptions)
    assert [(r.route.name, r.channel.name, r.immediate) for r in critical] == [
        ("mali", "email", True),
        ("low", "hook", True),
    ]
    info = recipients(make_alert(severity="info"), subscriptions)
    assert [(r.route.name, r.channel.name, r.immediate) for r in info] == [("mali", "email", False)]


# --- webhook secrets and targets ---------------------------------------------------------------------------


def _two_officers(first: str, second: str, head: str = "") -> str:
    return (
        f"{head}officers:\n"
        f"  - {{id: bko, name: B, language: fr, routes: [{{channel: {first}}}]}}\n"
        f"  - {{id: dkr, name: D, language: fr, routes: [{{channel: {second}}}]}}\n"
    )


def test_every_webhook_needs_a_secret_of_its_own() -> None:
    ok = parse_subscriptions(
        _two_officers(
            "{type: webhook, url: 'https://a.example/1', secret_env: SECRET_BKO}",
            "{type: webhook, url: 'https://a.example/1', secret: 'dakar-own-secret-0123'}",
        )
    )
    assert [o.id for o in ok.officers] == ["bko", "dkr"]
    cases = {
        "{type: webhook, url: 'https://a.example/2'}": "f.yaml:3: officers[1].routes[0].channel: a webhook needs "
        "its own secret",
        "{type: webhook, url: 'https://a.example/2', secret_env: SECRET_BKO}": "f.yaml:3: "
        "officers[1].routes[0].channel.secret_env: officer dkr uses the same webhook secret as officer bko (line 2)",
        "{type: webhook, url: 'https://a.example/2', secret: 'too-short'}": "f.yaml:3: officers[1].routes[0].channel: "
        "secret is shorter than 16 characters",
        "{type: webhook, url: 'https://a.example/2', secret_env: 'NOT A NAME'}": "f.yaml:3: "
        "officers[1].routes[0].channel.secret_env: String should match",
    }
    for second, expected in cases.items():
        with pytest.raises(SubscriptionsError) as caught:
            parse_subscriptions(
                _two_officers("{type: webhook, url: 'https://a.example/1', secret_env: SECRET_BKO}", second), "f.yaml"
            )
        assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems
    same_literal = "{type: webhook, url: 'https://a.example/1', secret: 'one-secret-for-two-agencies'}"
    with pytest.raises(SubscriptionsError, match="officer dkr uses the same webhook secret as officer bko"):
        parse_subscriptions(_two_officers(same_literal, same_literal))


def test_secrets_with_the_same_value_under_two_variables_are_unusable() -> None:
    subscriptions = parse_subscriptions(
        _two_officers(
            "{type: webhook, url: 'https://a.example/1', secret_env: SECRET_BKO}",
            "{type: webhook, url: 'https://a.example/1', secret_env: SECRET_DKR}",
        )
    )
    assert secret_problems(subscriptions, {"SECRET_BKO": "x" * 20, "SECRET_DKR": "y" * 20}) == {}
    assert secret_problems(subscriptions, {"SECRET_BKO": "x" * 20, "SECRET_DKR": "x" * 20}) == {
        "dkr/webhook": "its secret has the same value as officer bko's: each subscriber needs its own"
    }
    assert secret_problems(subscriptions, {"SECRET_BKO": "x" * 20, "SECRET_DKR": "short"}) == {
        "dkr/webhook": "the secret in SECRET_DKR is shorter than 16 characters"
    }
    assert "SECRET_DKR is not set" in secret_problems(subscriptions, {"SECRET_BKO": "x" * 20})["dkr/webhook"]


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://[2002:7f00:1::1]/hook", "loopback"),  # 6to4 around 127.0.0.1
        ("http://[2002:a9fe:a9fe::1]/hook", "link-local"),  # 6to4 around the cloud metadata address
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://100.64.0.1/hook", "not globally routable"),
    ],
)
def test_webhooks_to_loopback_link_local_or_private_addresses_are_refused_unless_allowed(url: str, kind: str) -> None:
    channel = f"{{type: webhook, url: '{url}', secret_env: SECRET_BKO}}"
    text = f"officers:\n  - {{id: bko, name: B, language: fr, routes: [{{channel: {channel}}}]}}\n"
    with pytest.raises(SubscriptionsError) as caught:
        parse_subscriptions(text, "f.yaml")
    (problem,) = caught.value.problems
    assert problem.startswith("f.yaml:2: officers[0].routes[0].channel.url: webhook target ") and f"({kind})" in problem
    assert "webhook_allowed_networks" in problem
    everything = "webhook_allowed_networks: ['0.0.0.0/0', '::/0', '::ffff:0:0/96']\n"
    assert parse_subscriptions(everything + text).officers[0].id == "bko"  # allowed on purpose, in the file
    allowed = parse_subscriptions(text, allowed_networks=["0.0.0.0/0", "::/0"])  # or by the settings
    assert allowed.target_policy(["0.0.0.0/0", "::/0"]).refusal("h", "127.0.0.1") is None
    assert parse_subscriptions(text.replace(url, "https://alertes.douanes.example.ml/hook")).officers


def test_alerts_go_in_clear_only_to_a_network_allowed_on_purpose() -> None:
    """An http:// webhook to a public address sent seizure and lab data across the internet in clear (the signature
    protects integrity, not confidentiality): refused at load for an IP literal, and at connection time for a name."""
    channel = "{type: webhook, url: 'URL', secret_env: SECRET_BKO}"
    text = f"officers:\n  - {{id: bko, name: B, language: fr, routes: [{{channel: {channel}}}]}}\n"
    with pytest.raises(SubscriptionsError, match=r"93\.184\.215\.14, a public address, and its URL is http://"):
        parse_subscriptions(text.replace("URL", "http://93.184.215.14/hook"), "f.yaml")
    assert parse_subscriptions(text.replace("URL", "https://93.184.215.14/hook")).officers
    own = "webhook_allowed_networks: [93.184.215.0/24]\n"  # the administrator's own network, on purpose
    assert parse_subscriptions(own + text.replace("URL", "http://93.184.215.14/hook")).officers

    class Public(AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
            return [{"hostname": host, "host": "93.184.215.14", "port": port, "family": family, "proto": 0, "flags": 0}]

        async def close(self) -> None:
            pass

    async def resolve(plain: bool) -> list[ResolveResult]:
        return await GuardedResolver(TargetPolicy(), Public(), plain=plain).resolve("hooks.example.org", 80)

    assert asyncio.run(resolve(plain=False))[0]["host"] == "93.184.215.14"  # https://: any public address
    with pytest.raises(TargetRefused, match=r"hooks\.example\.org is 93\.184\.215\.14, a public address, and its URL"):
        asyncio.run(resolve(plain=True))


def test_allowing_one_network_does_not_allow_the_others() -> None:
    policy = TargetPolicy.of(["127.0.0.0/8"])
    assert policy.refusal("h", "127.0.0.1") is None
    assert "169.254.169.254 (link-local)" in (policy.refusal("h", "169.254.169.254") or "")
    assert policy.refusal("h", "93.184.215.14") is None  # public
    with pytest.raises(SubscriptionsError, match=r"<subscriptions>:1: webhook_allowed_networks: 'intranet' is not"):
        parse_subscriptions("webhook_allowed_networks: [intranet]\nofficers: []\n")


# --- the routing property ---------------------------------------------------------------------------------

REGIONS = ["ML-BKO", "ML-1", "SN-DK", "SN-TH", "MA-CAS", "MA-RAB", "FR-75C"]
COUNTRIES = ["ML", "SN", "MA", "FR"]
FAMILIES = ["nitazene", "fentanyl", "synthetic_cathinone", "other"]
SUBSTANCES = [("Isotonitazene", "isokey"), ("3-MMC", "mmckey"), ("Ketamine", "ketkey")]
TYPES = ["new_substance", "first_in_region", "spike", "spread"]
SEVERITIES = ["info", "warning", "critical"]
CHANNELS = {
    "webhook": {"type": "webhook", "url": "http://127.0.0.1:9/h", "secret_env": "HOOK_SECRET"},
    "email": {"type": "email", "to": "x@y.org"},
    "pager": {"type": "webhook", "name": "pager", "url": "http://127.0.0.1:9/p", "secret_env": "PAGER_SECRET"},
}


def _subset(items: list[str]) -> st.SearchStrategy[list[str]]:
    """Unset half the time: with six filters, mostly-set routes would almost never match anything."""
    return st.one_of(st.just([]), st.lists(st.sampled_from(items), min_size=1, max_size=2, unique=True))


routes = st.fixed_dictionaries(
    {
        "countries": _subset(COUNTRIES),
        "regions": _subset(REGIONS),
        "families": _subset(FAMILIES),
        "substances": _subset([n for n, _ in SUBSTANCES] + [k for _, k in SUBSTANCES]),
        "alert_types": _subset(TYPES),
        "min_severity": st.sampled_from(SEVERITIES),
        "channel": st.sampled_from(sorted(CHANNELS)),
    },
    optional={"immediate_min_severity": st.sampled_from(SEVERITIES)},
)
officers = st.lists(
    st.fixed_dictionaries(
        {"routes": st.lists(routes, min_size=1, max_size=3), "threshold": st.sampled_from(SEVERITIES)}
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def alerts(draw: st.DrawFn) -> Alert:
    name, key = draw(st.sampled_from(SUBSTANCES))
    alert_type = draw(st.sampled_from(TYPES))
    fields: dict[str, Any] = {
        "alert_id": "p" * 24,
        "alert_type": alert_type,
        "severity": draw(st.sampled_from(SEVERITIES)),
        "substance": {"name": name, "key": key, "family": draw(st.sampled_from([*FAMILIES, None]))},
    }
    if alert_type == "spread" and draw(st.booleans()):
        fields |= {"region": None, "country": None, "details": {"regions": draw(_subset(REGIONS))}}
    else:
        region = draw(st.sampled_from(REGIONS))
        fields |= {"region": region, "country": region[:2]}
    return make_alert(**fields)


def _oracle(route: dict[str, Any], alert: Alert) -> bool:
    """The rule from the issue, written from the raw filter data: every set filter must match."""
    rank = SEVERITIES.index
    regions = [alert.region] if alert.region else list(alert.details.get("regions", []))
    countries = [r.split("-")[0] for r in regions] + ([alert.country] if alert.country else [])
    names = {alert.substance.name.lower(), alert.substance.key.lower()}
    checks = [
        rank(alert.severity) >= rank(route["min_severity"]),
        not route["alert_types"] or alert.alert_type in route["alert_types"],
        not route["families"] or alert.substance.family in route["families"],
        not route["substances"] or any(s.lower() in names for s in route["substances"]),
        not route["countries"] or any(c in route["countries"] for c in countries),
        not route["regions"] or any(r in route["regions"] for r in regions),
    ]
    return all(checks)


def _document(drawn: list[dict[str, Any]]) -> Subscriptions:
    return Subscriptions.model_validate(
        {
            "officers": [
                {
                    "id": f"officer-{i}",
                    "name": f"Officer {i}",
                    "language": "fr" if i % 2 else "en",
                    "immediate_min_severity": officer["threshold"],
                    "routes": [{**route, "channel": CHANNELS[route["channel"]]} for route in officer["routes"]],
                }
                for i, officer in enumerate(drawn)
            ]
        }
    )


@settings(max_examples=400, deadline=None)
@given(drawn=officers, alert=alerts())
def test_an_officer_receives_an_alert_exactly_when_one_of_their_routes_matches(
    drawn: list[dict[str, Any]], alert: Alert
) -> None:
    found = recipients(alert, _document(drawn))
    rank = SEVERITIES.index
    expected_officers = set()
    for i, officer in enumerate(drawn):
        matching = [r for r in officer["routes"] if _oracle(r, alert)]
        mine = [r for r in found if r.officer.id == f"officer-{i}"]
        if not matching:
            assert mine == []
            continue
        expected_officers.add(f"officer-{i}")
        immediate = [
            r for r in matching if rank(alert.severity) >= rank(r.get("immediate_min_severity", officer["threshold"]))
        ]
        if immediate:
            # once per channel, on exactly the channels of the immediate matching routes
            assert sorted(r.channel.name for r in mine) == sorted(
                {CHANNELS[r["channel"]].get("name", r["channel"]) for r in immediate}
            )
            assert all(r.immediate for r in mine)
        else:
            # one digest entry, on the first matching route's channel
            assert [(r.immediate, r.channel.name) for r in mine] == [
                (False, CHANNELS[matching[0]["channel"]].get("name", matching[0]["channel"]))
            ]
    assert {r.officer.id for r in found} == expected_officers
    keys = [r.key(alert.alert_id) for r in found]
    assert len(keys) == len(set(keys))  # never twice to the same officer and channel
