"""Counting chDB handles: chDB stops its engine when a process's last handle closes and restarts it on the next
connect (leaking ~5 threads and ~8 descriptors each time, chDB 26.9), so tests count handles, not threads."""

from __future__ import annotations

from typing import Any

import pytest


def count_chdb_handles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The handles open, counted only from now on, after each ``chdb.connect`` and each close (a list that grows).

    Wraps ``chdb.connect`` on the module, which clickhouse-connect and the engine process both call through.
    A 0 anywhere but at the end means the engine stopped (and would restart on the next connect).
    """
    import chdb

    real = chdb.connect
    counts: list[int] = []

    class _Counted:
        def __init__(self, connection: Any) -> None:
            self._connection = connection
            counts.append(counts[-1] + 1 if counts else 1)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._connection, name)

        def close(self) -> None:
            self._connection.close()
            counts.append(counts[-1] - 1)

    monkeypatch.setattr(chdb, "connect", lambda *args, **kwargs: _Counted(real(*args, **kwargs)))
    return counts
