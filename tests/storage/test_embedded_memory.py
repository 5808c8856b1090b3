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
from pathlib import Path
from typing import Any

import pytest

from synthwatch.bench.memory import engine_memory, process_memory
from synthwatch.stream_apps.storage.clickhouse import EMBEDDED_MALLOC_CONF, prepare_embedded_engine

_OPEN_AND_REPORT = """
import sys
from pathlib import Path
from synthwatch.stream_apps.storage.clickhouse import connect
from synthwatch.settings import Settings
client = connect(Settings(data_dir=Path(sys.argv[1])))
print(client.command("SELECT * FROM system.jemalloc_stats"))
"""


_BENCH = (sys.executable, "-m", "synthwatch.bench.memory")
_VARIANTS = ("--variants", "python,chdb-default")


def _engine_options(tmp_path: Path, **env: str) -> str:
    """jemalloc's statistics text from a child process that opened the engine through ``connect``."""
    clean = {k: v for k, v in os.environ.items() if k != "JE_MALLOC_CONF" and not k.startswith("SYNTHWATCH_")}
    result = subprocess.run(
        [sys.executable, "-c", _OPEN_AND_REPORT, str(tmp_path)],
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
