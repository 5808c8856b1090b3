"""Micro-benchmark: what writing changed detector state costs once the worker holds a long history.

The worker writes every state record a checkpoint touched to a Faust changelog (``drain_dirty`` →
JSON by pydantic-core → ``table.data[key] = bytes``; before 8de9e8d: the dict in the table and Faust's
JSON codec, ``--codec faust-json``). This builds realistic region-stage state
(``--regions`` × ``--substances`` series plus their families, ``--days`` of event time, ``--events``
reports, the density of ``bench_pipeline``'s RSS phase), then runs ``--batches`` more batches of
``--batch`` reports and prints records/s and bytes for ``drain_dirty`` alone and with the codec, and
the memory the live state and the table's copy of it take. Nothing here is a timed test.

    python -m synthwatch.bench.state            # 5,000 series, 60 days, 1,000,000 reports (~1 min)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from faust.serializers import codecs
from pydantic_core import to_json

from synthwatch.stream_apps.detect.alerting import Subject, day_of
from synthwatch.stream_apps.detect.region import Observation, RegionDetector

FAMILIES = ("cathinone", "nitazene", "benzodiazepine", "synthetic_cannabinoid", "phenethylamine", "other")
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class StateBenchResult:
    records: int
    drain_seconds: float
    encode_seconds: float
    encoded_bytes: int
    region_records: int
    region_bytes: int
    live_bytes: int
    table_extra_bytes: int
    events: int
    full_records: int = 0

    def lines(self) -> list[str]:
        series = self.records - self.region_records
        per = self.encoded_bytes / max(1, self.records)
        return [
            f"records written {self.records:,} ({self.region_records:,} region, {series:,} series) "
            f"for {self.events:,} reports",
            f"drain_dirty            {self.records / self.drain_seconds:,.0f} records/s "
            f"({self.drain_seconds / self.events * 1e6:.1f} us per report)",
            f"drain_dirty + encoding {self.records / (self.drain_seconds + self.encode_seconds):,.0f} records/s "
            f"({(self.drain_seconds + self.encode_seconds) / self.events * 1e6:.1f} us per report)",
            f"JSON bytes             {per:,.0f} per record, {self.encoded_bytes / self.events:,.0f} per report; "
            f"region records {self.region_bytes / max(1, self.region_records):,.0f} each",
            f"full records           {self.full_records:,} of {self.records:,}",
            f"memory: live state     {self.live_bytes / 2**20:,.1f} MiB",
            f"memory: table values   {self.table_extra_bytes / 2**20:,.1f} MiB beyond the live state",
        ]


def subjects(substances: int) -> list[Subject]:
    """``substances`` distinct subjects spread over a few families."""
    return [
        Subject(f"KEY{i:04d}", f"Substance {i}", None, FAMILIES[i % len(FAMILIES)], False, True)
        for i in range(substances)
    ]


def stream(regions: int, substances: int, step: timedelta, events: int, first: int = 0) -> Iterator[Observation]:
    """Reports ``step`` apart in event time, round-robin over regions and substances (as ``bench_pipeline``)."""
    names = [f"XX-R{r:03d}" for r in range(regions)]
    subs = subjects(substances)
    for n in range(first, first + events):
        region = names[n % regions]
        subject = subs[(n // regions + n // (regions * substances)) % substances]
        at = START + step * n
        seizure = (n // regions) % 2 == 0
        grams = 1.0 + (n * 7919) % 500 if seizure else None
        kind = "border_seizure" if seizure else "lab_detection"
        yield Observation(f"rss-0-{n}", kind, at, day_of(at), "XX", region, subject, grams, None, None)


def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes of ``obj`` and everything it holds, counting each object once across calls with one ``seen``."""
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif hasattr(item, "__slots__"):
            stack.extend(getattr(item, s) for s in item.__slots__ if hasattr(item, s))
    return total


def run(
    regions: int, substances: int, days: int, events: int, batches: int, batch: int, codec: str = "pydantic-core"
) -> StateBenchResult:
    """Build the state, then time ``batches`` batches' worth of state writes as the worker does them."""
    keep_bytes = codec == "pydantic-core"  # the table holds the JSON bytes, or (faust-json) the dict
    dumps = to_json if keep_bytes else codecs.get_codec("json").dumps
    detector = RegionDetector()
    table: dict[str, Any] = {}
    step = timedelta(days=days) / events
    for obs in stream(regions, substances, step, events):
        detector.observe(obs, emit=False)
    for _, key, value in detector.drain_dirty():  # the table as the worker holds it after the history
        table[key] = dumps(value) if keep_bytes else value
    gc.collect()  # as the worker does once ready (settings.gc_freeze)
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    step_events = batches * batch
    more = stream(regions, substances, step, step_events, first=events)
    drain = encode = 0.0
    written = encoded = region_records = region_bytes = full = 0
    for _ in range(batches):
        for _, obs in zip(range(batch), more, strict=False):
            detector.observe(obs, emit=False)
        started = time.perf_counter()
        changes = detector.drain_dirty()
        middle = time.perf_counter()
        for _, key, value in changes:
            data = dumps(value)
            table[key] = data if keep_bytes else value
            encoded += len(data)
            full += "+" not in key.split(":", 1)[0]
            if key.startswith("R"):  # "R:" full records and "R+:" deltas
                region_records += 1
                region_bytes += len(data)
        done = time.perf_counter()
        drain += middle - started
        encode += done - middle
        written += len(changes)
    seen: set[int] = set()
    live = deep_size(detector.regions, seen) + deep_size(detector.series, seen)
    extra = deep_size(table, seen)
    return StateBenchResult(
        written, drain, encode, encoded, region_records, region_bytes, live, extra, step_events, full_records=full
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--substances", type=int, default=50)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1000, help="Reports per checkpoint (records written once).")
    parser.add_argument("--codec", choices=("pydantic-core", "faust-json"), default="pydantic-core")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(args.regions, args.substances, args.days, args.events, args.batches, args.batch, args.codec)
    for line in result.lines():
        print(line)
    print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
