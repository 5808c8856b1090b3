"""A tracemalloc snapshot of the running worker, written on SIGUSR2 (diagnostics only, off by default).

Why: the worker's Python heap after a long backlog (docs/performance.md, issue 16) is only visible from
inside the process, and a census of objects by type cannot say which code allocated them. With
``PYTHONTRACEMALLOC=N`` in its environment (Python then traces every allocation from start-up, with ``N``
frames) and :attr:`Settings.tracemalloc_dump` set, ``kill -USR2 PID`` writes ``tracemalloc.Snapshot.dump``
to that file (read it with ``tracemalloc.Snapshot.load``). Tracing costs time and memory on every
allocation, so this is for measuring runs, never for production: without both settings nothing is installed.
"""

from __future__ import annotations

import logging
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

log = logging.getLogger("synthwatch.stack.worker")


def dump_snapshot(path: Path) -> Path:
    """Write the traced allocations to ``path`` (through a temporary file, so a reader never sees half)."""
    snapshot = tracemalloc.take_snapshot()
    partial = path.with_name(path.name + ".partial")
    snapshot.dump(str(partial))
    os.replace(partial, path)
    return path


def install_snapshot_on_signal(path: Path | None, signum: int = signal.SIGUSR2) -> bool:
    """Dump a snapshot to ``path`` on ``signum``; True if installed (tracing on and a path given)."""
    if path is None:
        return False
    if not tracemalloc.is_tracing():
        log.warning("tracemalloc_dump is set but tracemalloc is off: start the worker with PYTHONTRACEMALLOC=N")
        return False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        written = dump_snapshot(path)
        current, peak = tracemalloc.get_traced_memory()
        log.warning("tracemalloc snapshot written to %s (traced %d B, peak %d B)", written, current, peak)

    signal.signal(signum, on_signal)
    log.warning("tracemalloc is on (slow): SIGUSR2 writes a snapshot to %s", path)
    return True
