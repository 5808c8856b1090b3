"""``python -m synthwatch.bench.core``: the detector core's CPU over a simulated stream, compiled against pure Python.

Why: the compiled detection core (stream_apps/detect/compiled.py) is worth its build only while it saves a
good share of the core's CPU. Each round runs the same observations through ``Detector.observe`` in two fresh
interpreters, one with the compiled modules and one with ``SYNTHWATCH_COMPILED_CORE=0``, alternately, and
times only the detector (``time.process_time``: the machine is shared, wall time moves with other work). The
alerts of both are hashed and must be the same. The ratio of medians is printed with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from rich.console import Console
from rich.table import Table

_ROUND = """
import gc, hashlib, json, sys, time
from datetime import date
from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import WireError
from synthwatch.schemas.wire import parse_limited
from synthwatch.stream_apps.detect import compiled
from synthwatch.stream_apps.detect.backtest import _observe_all
from synthwatch.stream_apps.detect.intake import Intake
from synthwatch.stream_apps.detect.region import Detector, Observation

days, seed = int(sys.argv[1]), int(sys.argv[2])
intake, fields = Intake(stage="backtest"), []
for i, line in enumerate(simulate(SimulationConfig(days=days, seed=seed, start=date(2026, 1, 1))).lines):
    try:
        fields.append(Observation.fields_of(intake.enrich(parse_limited(line), f"sim:{i}")))
    except WireError:
        pass
detector = Detector()
detector.novelty.similarity  # the catalogue's fingerprints, built before the clock starts (as the backtest does)
observations = [Observation(*f) for f in fields]
gc.disable()
started = time.process_time()
found = _observe_all(detector, set(), observations)
cpu = time.process_time() - started
digest = hashlib.sha256()
for alert in found.alerts:
    digest.update(alert.model_dump_json(exclude={"detected_at"}).encode())
print(json.dumps({"compiled": compiled.in_use(), "observations": len(observations), "alerts": len(found.alerts),
                  "digest": digest.hexdigest(), "cpu": cpu}))
"""


def _round(compiled_core: bool, days: int, seed: int) -> dict[str, object]:
    env = {**os.environ, "SYNTHWATCH_COMPILED_CORE": "1" if compiled_core else "0"}
    done = subprocess.run(
        [sys.executable, "-c", _ROUND, str(days), str(seed)], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["compiled"] is not compiled_core:
        raise RuntimeError(f"asked for compiled={compiled_core}, ran compiled={result['compiled']}: `make install`?")
    return result


def bench_core(console: Console, days: int = 365, seed: int = 1, rounds: int = 3) -> float:
    """Pure / compiled ratio of the medians of the detector core's CPU seconds (above 1: compiled is faster)."""
    cpu: dict[bool, list[float]] = {False: [], True: []}
    digests: set[tuple[int, int, str]] = set()
    loads: list[float] = []
    for _ in range(rounds):
        for compiled_core in (False, True):
            loads.append(os.getloadavg()[0])
            result = _round(compiled_core, days, seed)
            cpu[compiled_core].append(float(str(result["cpu"])))
            digests.add((int(str(result["observations"])), int(str(result["alerts"])), str(result["digest"])))
    if len(digests) != 1:
        raise RuntimeError(f"the compiled and the pure core gave different alerts: {digests}")
    ((observations, alerts, _),) = digests
    pure, fast = statistics.median(cpu[False]), statistics.median(cpu[True])
    table = Table(
        title=f"detector core CPU, {days}-day stream (seed {seed}): {observations:,} observations, {alerts:,} "
        f"alerts, identical; {rounds} rounds alternating, 1-min load {min(loads):.1f}-{max(loads):.1f}"
    )
    for column in ("core", "CPU s per round", "median", "µs per observation"):
        table.add_column(column, justify="left" if column == "core" else "right")
    for name, values in (("pure Python", cpu[False]), ("compiled (mypyc)", cpu[True])):
        median = statistics.median(values)
        table.add_row(
            name, " / ".join(f"{v:.2f}" for v in values), f"{median:.2f}", f"{median / observations * 1e6:.1f}"
        )
    console.print(table)
    console.print(f"pure / compiled: {pure / fast:.2f} x")
    return pure / fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bench_core(Console(), days=args.days, seed=args.seed, rounds=args.rounds)


if __name__ == "__main__":
    main()
