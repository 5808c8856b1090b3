"""``synthwatch bench core`` runs what it says: each round's pure and compiled detector in fresh interpreters, with
the same alerts (it refuses to print a ratio otherwise). No speed is asserted: speed is the benchmark's to print."""

from __future__ import annotations

import io

from rich.console import Console

from synthwatch.bench.core import bench_core


def test_the_core_bench_compares_the_pure_and_the_compiled_core_on_the_same_alerts() -> None:
    out = io.StringIO()
    ratio = bench_core(Console(file=out, width=200), days=15, seed=2, rounds=1)
    printed = out.getvalue()
    assert ratio > 0
    assert "pure Python" in printed and "compiled (mypyc)" in printed and "identical" in printed
    assert f"pure / compiled: {ratio:.2f} x" in printed
