"""The worker's tracemalloc snapshot on SIGUSR2 (diagnostics, off unless tracing and a path are both set)."""

from __future__ import annotations

import os
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from synthwatch.stream_apps.runtime.memtrace import install_snapshot_on_signal


@pytest.fixture
def usr2_restored() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_nothing_is_installed_without_a_path_or_without_tracing(tmp_path: Path, usr2_restored: None) -> None:
    before = signal.getsignal(signal.SIGUSR2)
    assert not install_snapshot_on_signal(None)
    assert not tracemalloc.is_tracing()
    assert not install_snapshot_on_signal(tmp_path / "snap.dump")
    assert signal.getsignal(signal.SIGUSR2) is before


def test_sigusr2_writes_a_snapshot_that_holds_what_was_allocated(tmp_path: Path, usr2_restored: None) -> None:
    target = tmp_path / "snap.dump"
    tracemalloc.start(4)
    try:
        assert install_snapshot_on_signal(target)
        held = [bytearray(1 << 20) for _ in range(3)]  # 3 MiB allocated on a line of this file
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs before the next bytecode of this thread
        assert target.exists()
        assert not target.with_name("snap.dump.partial").exists()
    finally:
        tracemalloc.stop()
    ours = tracemalloc.Snapshot.load(str(target)).filter_traces([tracemalloc.Filter(True, __file__)])
    assert sum(s.size for s in ours.statistics("filename")) >= 3 << 20
    assert len(held) == 3
