"""The embedded engine's allocator options, and the memory benchmark's readings, on the real engine.

chDB reads its jemalloc options once, when it is loaded, so the checks that need a fresh load run in a
child process; the pytest process already holds the session's engine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from synthwatch.bench.memory import (
    CHART_BEGIN,
    CHART_END,
    RssSeries,
    engine_memory,
    process_memory,
    smaps_split,
    write_rss_chart,
)
from synthwatch.stream_apps.storage.clickhouse import EMBEDDED_MALLOC_CONF, prepare_embedded_engine

_OPEN_AND_REPORT = """
import sys
from pathlib import Path
from synthwatch.stream_apps.storage.clickhouse import connect
from synthwatch.settings import Settings
client = connect(Settings(data_dir=Path(sys.argv[1])))
print(client.command("SELECT * FROM system.jemalloc_stats"))
"""

#: The same, opened by the door every embedded client goes through (the test session's engine is opened so).
_OPEN_DIRECTLY_AND_REPORT = """
import sys
from synthwatch.stream_apps.storage.clickhouse import embedded_client
client = embedded_client(f"chdb://{sys.argv[1]}")
print(client.command("SELECT * FROM system.jemalloc_stats"))
"""


_BENCH = (sys.executable, "-m", "synthwatch.bench.memory")
_VARIANTS = ("--variants", "python,chdb-default")


def _engine_options(tmp_path: Path, script: str = _OPEN_AND_REPORT, **env: str) -> str:
    """jemalloc's statistics text from a child process that opened the engine through ``connect``."""
    clean = {k: v for k, v in os.environ.items() if k != "JE_MALLOC_CONF" and not k.startswith("SYNTHWATCH_")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.replace("\\n", "\n")


def _dirty_decay_ms(stats: str) -> int:
    match = re.search(r"opt\.dirty_decay_ms: (-?\d+)", stats)
    assert match, stats[:2000]
    return int(match.group(1))


@pytest.mark.integration
def test_connect_opens_the_embedded_engine_with_freed_pages_returned_within_a_second(tmp_path: Path) -> None:
    assert EMBEDDED_MALLOC_CONF == "dirty_decay_ms:1000"
    assert _dirty_decay_ms(_engine_options(tmp_path)) == 1000


@pytest.mark.integration
def test_a_client_opened_without_connect_gets_the_same_allocator_options(tmp_path: Path) -> None:
    """``embedded_client`` is the one door to the engine (the test session's hold opens it directly): a process
    whose first client came through it loaded chDB with chDB's own ``dirty_decay_ms:5000``. Failed before: 5000."""
    assert _dirty_decay_ms(_engine_options(tmp_path, _OPEN_DIRECTLY_AND_REPORT)) == 1000


@pytest.mark.integration
def test_an_allocator_setting_from_the_operator_wins(tmp_path: Path) -> None:
    assert _dirty_decay_ms(_engine_options(tmp_path, JE_MALLOC_CONF="dirty_decay_ms:2000")) == 2000


def test_nothing_is_set_once_chdb_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import chdb  # noqa: F401  (loaded: its allocator has read its options already)

    monkeypatch.delenv("JE_MALLOC_CONF", raising=False)
    assert prepare_embedded_engine() is False
    assert "JE_MALLOC_CONF" not in os.environ


def test_process_memory_reads_this_process() -> None:
    memory = process_memory()
    assert memory["VmRSS"] > 10_000  # KiB: a Python process with the package imported
    assert memory["VmHWM"] >= memory["VmRSS"]
    assert memory["RssAnon"] + memory["RssFile"] <= memory["VmRSS"]
    assert memory["Threads"] >= 1


@pytest.mark.integration
def test_engine_memory_reads_the_engine_allocator(ch: Any) -> None:
    memory = engine_memory(ch)
    assert 0 < memory["jemalloc_allocated"] <= memory["jemalloc_active"] <= memory["jemalloc_mapped"]
    assert memory["jemalloc_resident"] > 0
    assert memory["parts"] >= 0


@pytest.mark.integration
def test_bench_memory_prints_each_variant(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    result = subprocess.run(
        [*_BENCH, "--events", "3000", "--batch", "1000", "--every", "1000", *_VARIANTS, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    assert "RSS after 3,000 keyed events" in result.stdout
    rows = json.loads(out.read_text())
    assert [r["events"] for r in rows["python"]] == [0, 1000, 2000, 3000]
    assert [r["at"] for r in rows["chdb-default"]][:2] == ["start", "engine open"]
    assert rows["chdb-default"][-1]["events"] == 3000
    assert "jemalloc_resident" in rows["chdb-default"][-1] and "jemalloc_resident" not in rows["python"][-1]


def test_smaps_split_adds_up_to_this_process_rss() -> None:
    import chdb  # noqa: F401  (the engine's library mapped: its resident pages are counted apart)

    split = smaps_split()
    assert split["engine_code"] > 0
    total = sum(split.values())
    rss = process_memory()["VmRSS"]
    assert split["anon"] > 0 and split["other_files"] > 0  # the interpreter's heap and its own code
    assert abs(total - rss) <= max(2048, rss // 20)  # read a moment apart: within 5 % (or 2 MiB)


def test_rss_series_reads_a_point_each_time_the_count_passes_a_step() -> None:
    counts = iter([0, 40, 99, 100, 101, 250, 260, 300])
    last = [0]

    def counted() -> int:
        last[0] = next(counts, last[0])
        return last[0]

    series = RssSeries(os.getpid(), counted, every=100, engine=lambda: 7, interval=0.001).start()
    deadline = time.monotonic() + 10
    while len(series.points) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    points = series.finish(300)
    # the start, then the first reading at or past each step of 100 (a step the count jumps over is not repeated)
    assert [p.events for p in points] == [0, 100, 250, 300]
    assert all(p.rss_kib > 0 and p.engine_heap_mib == 7 for p in points)
    assert all(0 <= p.engine_code_kib <= p.file_kib for p in points)  # the library's pages are file-backed


def _series_results(points: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rss": {"events": 200, "events_before": 1000, "series": points}}


def _point(events: int, rss_mib: int, heap: int | None) -> dict[str, Any]:
    return {
        "events": events,
        "seconds": events / 10,
        "rss_kib": rss_mib * 1024,
        "peak_kib": rss_mib * 1024,
        "anon_kib": rss_mib * 512,
        "file_kib": rss_mib * 512,
        "engine_code_kib": 100 * 1024,
        "engine_heap_mib": heap,
    }


def test_the_rss_chart_is_written_between_its_markers_from_a_run(tmp_path: Path) -> None:
    results = tmp_path / "pipeline.json"
    results.write_text(json.dumps(_series_results([_point(0, 600, 50), _point(200, 700, None)])))
    doc = tmp_path / "performance.md"
    doc.write_text(f"# before\n{CHART_BEGIN}\nold chart\n{CHART_END}\nafter\n")
    write_rss_chart(results, doc)
    text = doc.read_text()
    assert text.startswith(f"# before\n{CHART_BEGIN}\n```mermaid\nxychart-beta\n") and "old chart" not in text
    assert text.endswith(f"{CHART_END}\nafter\n")
    assert '    x-axis "events consumed by the worker (thousands)" [1, 1]' in text  # 1,000 and 1,200 events
    assert "    line [600, 700]" in text and "    line [512, 512]" in text
    assert "| 1,000 | 0 | 600 | 600 | 300 | 100 | 50 | 450 |" in text
    assert "| 1,200 | 20 | 700 | 700 | 350 | 100 |  |  |" in text  # no engine reading: not made up
    write_rss_chart(results, doc)  # again: the block is replaced, not repeated
    assert doc.read_text() == text


def test_the_rss_chart_refuses_a_run_without_a_series_or_a_doc_without_markers(tmp_path: Path) -> None:
    results, doc = tmp_path / "pipeline.json", tmp_path / "performance.md"
    results.write_text(json.dumps({"e2e": {}}))
    doc.write_text(f"{CHART_BEGIN}\n{CHART_END}\n")
    with pytest.raises(ValueError, match="no RSS series"):
        write_rss_chart(results, doc)
    results.write_text(json.dumps(_series_results([_point(0, 600, 50)])))
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="no generated block"):
        write_rss_chart(results, doc)
