"""What the benchmarks feed the pipeline and how they report it: topics, simulated and keyed input lines,
publishing, percentiles, ratios and the machine they ran on.

Why one module: the pipeline, memory, crash and reliability benchmarks drive the same streams (the
pipeline benchmark's keyed stream is the memory benchmark's RSS stream), and they must stay the same
stream for their numbers to be compared.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from pydantic import SecretStr
from rich.console import Console

from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, ensure_topics


@dataclass
class Topics:
    """One set of topic names (fresh per phase that needs its own)."""

    suffix: str
    labs: str = ""
    seizures: str = ""
    rejects: str = ""
    alerts: str = ""
    sightings: str = ""
    # The worker key the phase's workers and publisher share (the worker refuses rejects it cannot verify,
    # and each bench worker has a data directory of its own, so none would find the publisher's key).
    worker_key: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    def __post_init__(self) -> None:
        s = self.suffix
        self.labs, self.seizures = self.labs or f"bench-labs-{s}", self.seizures or f"bench-seizures-{s}"
        self.rejects, self.alerts = f"bench-rejects-{s}", f"bench-alerts-{s}"
        self.sightings = f"bench-sightings-{s}"

    @property
    def inputs(self) -> tuple[str, str]:
        return (self.labs, self.seizures)

    def settings(self, base: Settings, **changes: Any) -> Settings:
        return base.model_copy(
            update={
                "topic_lab_detections": self.labs,
                "topic_border_seizures": self.seizures,
                "topic_rejects": self.rejects,
                "topic_alerts": self.alerts,
                "topic_sightings": self.sightings,
                "worker_key": base.worker_key or SecretStr(self.worker_key),
                **changes,
            }
        )

    def created(self, base: Settings, servers: str, **changes: Any) -> Settings:
        """:meth:`settings`, with these topics created on the broker at ``servers`` (a phase's first step)."""
        settings = self.settings(base, **changes)
        ensure_topics(settings, servers)
        return settings


# --- input streams ----------------------------------------------------------------------------------------


def simulated_lines(events: int, seed: int = 5, start: date = date(2025, 1, 1)) -> list[str]:
    """About ``events`` simulated lines over 30 days (bad lines, re-sends and late reports included)."""
    from synthwatch.producers.simulate import SimulationConfig, simulate

    per_day = min(100_000.0, max(10.0, events / 30))
    return simulate(SimulationConfig(days=30, seed=seed, start=start, events_per_day=per_day)).lines


def bench_regions(count: int = 100) -> list[tuple[str, str]]:
    """``count`` (country, region) pairs the wire contract accepts, spread over ten countries."""
    import pycountry

    from synthwatch.schemas import WireError, parse_event

    countries = ("FR", "DE", "ES", "IT", "PL", "NL", "BE", "PT", "GB", "US")
    per_country: list[list[tuple[str, str]]] = []
    for country in countries:
        valid = []
        for sub in sorted(pycountry.subdivisions.get(country_code=country) or [], key=lambda s: s.code):
            line = seizure_line("probe", country, sub.code, "Cocaine", "2025-01-01T00:00:00+00:00", 0)
            try:
                parse_event(line)
            except WireError:
                continue
            valid.append((country, sub.code))
        per_country.append(valid)
    found: list[tuple[str, str]] = []
    for i in range(max(len(v) for v in per_country)):
        found += [valid[i] for valid in per_country if i < len(valid)]
    return found[:count]


def bench_substances(count: int = 50) -> list[str]:
    from synthwatch.catalogue import shipped_catalogue

    return [entry.name for entry in shipped_catalogue()[:count]]


def seizure_line(event_id: str, country: str, region: str, name: str, at: str, i: int) -> str:
    return (
        f'{{"event_id":"{event_id}","kind":"border_seizure","occurred_at":"{at}","country":"{country}",'
        f'"region":"{region}","substance":{{"name":"{name}"}},"agency":"Bench customs","seizure_id":"S{i}",'
        f'"border_point":"Bench port","conveyance":"land","quantity":{{"value":{1 + i % 97}.5,"unit":"g"}}}}'
    )


def lab_line(event_id: str, country: str, region: str, name: str, at: str, i: int) -> str:
    return (
        f'{{"event_id":"{event_id}","kind":"lab_detection","occurred_at":"{at}","country":"{country}",'
        f'"region":"{region}","substance":{{"name":"{name}"}},"lab_id":"LAB-B","sample_id":"B{i}",'
        f'"sample_type":"seized_material","method":"GC-MS","purity_pct":{i % 100}.0}}'
    )


def keyed_lines(
    count: int,
    prefix: str,
    start: datetime,
    span: timedelta,
    regions: Sequence[tuple[str, str]],
    substances: Sequence[str],
) -> Iterator[str]:
    """``count`` valid events cycling over regions x substances, in time order (a million in seconds).

    Region = i mod R, substance = (i div R) mod S, so every key recurs every R x S events; the kind
    alternates per block of R, so both input topics carry traffic.
    """
    step = span / max(count, 1)
    n_regions, n_substances = len(regions), len(substances)
    for i in range(count):
        country, region = regions[i % n_regions]
        name = substances[(i // n_regions) % n_substances]
        line = lab_line if (i // n_regions) % 2 else seizure_line
        yield line(f"{prefix}-{i}", country, region, name, (start + step * i).isoformat(), i)


def publish_lines(settings: Settings, servers: str, lines: Iterator[str], source: str = "bench") -> Any:
    """``Publisher.publish_records`` (validation, keys by region, acks counted) over ``lines``."""
    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import InputRecord

    with Publisher(settings, servers) as publisher:
        return publisher.publish_records(
            InputRecord(source=f"{source}:{i}", raw=line) for i, line in enumerate(lines, start=1)
        )


# --- reporting ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float, *, nearest_rank: bool = False) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``; NaN when there are none.

    Linear interpolation between the closest ranks by default; ``nearest_rank``: the smallest value with at
    least ``q`` % of the values at or below it (always a value that was measured; the pipeline benchmark's
    alert latency, whose published numbers use it).
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    if nearest_rank:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def events_rate(value: float) -> str:
    return f"{value:,.0f} events/s"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 else ""


@contextlib.contextmanager
def bench_broker(base: Settings, console: Console) -> Iterator[str]:
    """The configured Kafka, or an embedded Tansu this function starts and stops."""
    if base.kafka_bootstrap_servers:
        console.print(f"Kafka: the configured cluster {base.kafka_bootstrap_servers}")
        yield base.kafka_bootstrap_servers
        return
    with EmbeddedBroker(base) as broker:
        console.print(f"Kafka: embedded Tansu on {broker.bootstrap_servers}")
        yield broker.bootstrap_servers


def machine() -> str:
    memory = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as meminfo:
        memory = f", {int(meminfo.readline().split()[1]) / 1024 / 1024:.1f} GiB RAM"
    load = ""
    with contextlib.suppress(OSError):
        load = f", load {os.getloadavg()[0]:.2f}"
    return f"{os.cpu_count()} cores{memory}{load}"
