"""Where webhooks may go: public addresses only, unless a network is explicitly allowed.

A webhook URL is chosen by whoever edits the subscriptions file, and the worker POSTs signed alerts to
it from inside the deployment. Left open, ``http://169.254.169.254/`` (cloud metadata), ``127.0.0.1``
(the worker's own ports) or ``10.x`` (ClickHouse, Grafana) turn delivery into a request forger. So every
address a webhook connects to must be globally routable, or inside a network the administrator allowed
(the subscriptions file's ``webhook_allowed_networks`` or ``SYNTHWATCH_WEBHOOK_ALLOWED_NETWORKS``).

The check runs twice: on the URL when the file is loaded (an IP literal or ``localhost``), and on every
address DNS returns at connection time (``webhook.GuardedResolver``), so a name that resolves to a private
address later (DNS rebinding) is refused too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["127.0.0.0/8", "10.1.2.3"]`` -> networks; raises ValueError naming the bad item."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP network (e.g. 127.0.0.0/8 or 10.20.0.0/16)") from None
    return tuple(out)


def in_clear(url: str) -> bool:
    """Whether a webhook URL sends in clear (anything but ``https://``): :meth:`TargetPolicy.refusal`'s ``plain``."""
    return urlsplit(url).scheme.lower() != "https"


def _kind(address: IPAddress) -> str | None:
    """Why an address is not public ('loopback', 'link-local', ...), or None for a global address."""
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 is loopback too; so is 2002:7f00:1:: (6to4 carries the IPv4 address it wraps, and
        # Python calls 2002::/16 global whatever it wraps). Teredo (2001::/32) and NAT64 are refused as they are.
        address = address.ipv4_mapped or address.sixtofour or address
    for name in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    return None if address.is_global else "not globally routable"


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Public addresses, plus the ``allowed`` networks; :meth:`refusal` says why an address is not allowed."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def of(cls, *groups: Iterable[str]) -> TargetPolicy:
        return cls(tuple(n for group in groups for n in parse_networks(group)))

    def refusal(self, host: str, address: str, *, plain: bool = False) -> str | None:
        """None if ``address`` (what ``host`` resolved to) may be connected to; else the reason and the fix.

        ``plain``: the URL is ``http://``. Alerts carry seizure and lab data shared under agreement, and the
        signature protects their integrity, not their confidentiality: in clear they may only go to a network
        the administrator allowed (their own), never to a public address across the internet.
        """
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{host}: {address!r} is not an IP address"
        if any(ip in network for network in self.allowed):
            return None
        kind = _kind(ip)
        if kind is None and not plain:
            return None
        if kind is None:
            return (
                f"webhook target {host} is {address}, a public address, and its URL is http://: alerts would "
                "cross the internet in clear. Use https://, or allow its network on purpose with "
                "webhook_allowed_networks if it is your own"
            )
        return (
            f"webhook target {host} is {address} ({kind}): refused. Allow it on purpose with "
            "webhook_allowed_networks in the subscriptions file or SYNTHWATCH_WEBHOOK_ALLOWED_NETWORKS"
        )

    def literal_refusal(self, host: str, *, plain: bool = False) -> str | None:
        """Check a URL host before any DNS: an IP literal, or a ``localhost`` name (always loopback)."""
        name = host.strip("[]").rstrip(".").lower()
        try:
            ipaddress.ip_address(name.split("%", 1)[0])
        except ValueError:
            if name == "localhost" or name.endswith(".localhost"):
                return self.refusal(host, "127.0.0.1", plain=plain)
            return None
        return self.refusal(host, name, plain=plain)
