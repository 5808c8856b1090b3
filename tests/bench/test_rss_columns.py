"""The pipeline benchmark's RSS series columns: each figure from the process it belongs to.

With the engine in the worker its code and heap are part of the worker's RSS and "rest" subtracts them; with the
engine in a process of its own (``--engine-process``) neither is, and "rest" subtracting the engine process's heap
from the worker's RSS (as it did) made up a number. Fixed readings: the arithmetic, not the machine.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict

from synthwatch.bench.memory import RssColumns, RssPoint, RssSeries, rss_chart, rss_columns

MIB = 1024


def _embedded(heap: int | None = 150) -> RssPoint:
    """The engine in the worker: 1,000 MiB RSS, of it 300 MiB chDB code and ``heap`` MiB engine heap."""
    return RssPoint(100_000, 60.0, 1000 * MIB, 1100 * MIB, 620 * MIB, 380 * MIB, 300 * MIB, heap)


def _apart(worker_code: int = 0) -> RssPoint:
    """The engine in its own process: worker 680 MiB RSS (``worker_code`` MiB chDB code), engine 512 MiB RSS of
    which 300 MiB chDB code, its heap 142 MiB (read through the worker's /sql, from the engine process)."""
    point = RssPoint(100_000, 60.0, 680 * MIB, 704 * MIB, 622 * MIB, 58 * MIB, worker_code * MIB, 142)
    point.engine_process_rss_kib, point.engine_process_code_kib = 512 * MIB, 300 * MIB
    return point


def test_with_the_engine_in_the_worker_rest_is_its_rss_less_the_engine_code_and_heap() -> None:
    c = RssColumns.of(_embedded())
    assert (c.rss, c.engine_code, c.engine_heap, c.rest) == (1000, 300, 150, 550)
    assert c.engine_process_rss is None
    assert RssColumns.of(_embedded(heap=None)).rest is None  # the heap not read: no rest made up


def test_with_the_engine_in_its_own_process_rest_subtracts_only_what_is_in_the_worker() -> None:
    c = RssColumns.of(_apart())
    # Before: 680 - 0 - 142 = 538, the engine process's heap taken off the worker's RSS.
    assert c.rest == 680
    assert (c.engine_process_rss, c.engine_code, c.engine_heap, c.worker_engine_code) == (512, 300, 142, 0)
    assert RssColumns.of(_apart(worker_code=5)).rest == 675  # chDB code mapped in the worker itself: its own


def test_the_series_table_and_chart_show_the_engine_process_beside_the_worker() -> None:
    names, rows = rss_columns([_apart()], offset=584)
    assert dict(zip(names, rows[0], strict=True)) == {
        "events (worker)": "100,584",
        "events (phase)": "100,000",
        "s": "60",
        "RSS": "680",
        "peak": "704",
        "anon": "622",
        "engine code in worker": "0",
        "rest": "680",
        "engine process RSS": "512",
        "its engine code": "300",
        "its engine heap": "142",
    }
    names, rows = rss_columns([_embedded()])
    assert names[-3:] == ["engine code", "engine heap", "rest"] and rows[0][-3:] == ["300", "150", "550"]
    chart = rss_chart({"events_before": 584, "series": [asdict(_apart())]})
    assert "| 100,584 | 60 | 680 | 704 | 622 | 0 | 680 | 512 | 300 | 142 |" in chart
    assert "not in the worker's RSS" in chart


def test_the_series_reads_the_engine_process_from_that_process() -> None:
    """``engine_pid``: the engine process's RSS and chDB code are read from its /proc, not the worker's (a
    ``sleep`` stands in: it maps no chDB)."""
    engine = subprocess.Popen(["sleep", "60"])
    try:
        series = RssSeries(os.getpid(), lambda: 0, engine=lambda: 7, engine_pid=engine.pid).start()
        (point,) = series.finish(0)
    finally:
        engine.kill()
        engine.wait()
    assert point.engine_process_rss_kib is not None and 0 < point.engine_process_rss_kib < point.rss_kib
    assert point.engine_process_code_kib == 0
    assert RssColumns.of(point).rest == point.rss_kib / 1024 - point.engine_code_kib / 1024


def _summary(engine_rss_mib: int, engine_peak_mib: int) -> str:
    """The pipeline benchmark's closing table for an RSS phase whose worker ended at 680 MiB (peak 704)."""
    import io

    from rich.console import Console

    from synthwatch.bench.pipeline import _print_table

    rss = {"events": 1_000_000, "rate": 530.0, "keys": 5000, "worker_total_events": 1_100_584}
    rss |= {"rss_kib": 680 * MIB, "peak_kib": 704 * MIB}
    rss |= {"engine_rss_kib": engine_rss_mib * MIB, "engine_peak_kib": engine_peak_mib * MIB}
    out = io.StringIO()
    _print_table(Console(file=out, width=400), {"machine": "test", "rss": rss})
    return out.getvalue()


def test_the_summary_says_the_engine_process_rss_beside_the_worker_s() -> None:
    assert "512 MiB (566 MiB); 1,192 MiB" in _summary(512, 566)
    assert "engine process RSS" not in _summary(0, 0)  # the engine in the worker: its RSS is the worker's
