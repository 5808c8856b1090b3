"""The embedded engine stays up in a process between its clients (chDB restarts it after its last handle closes,
and each restart leaks threads and descriptors: :class:`synthwatch.stream_apps.storage.clickhouse._EngineAnchor`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.clickhouse import connect, engine_scratch_directory, release_embedded_engine
from synthwatch.stream_apps.storage.engine_server import Engine
from synthwatch.stream_apps.storage.query import QueryError, analyst_client, run_query
from tests.support.chdb_handles import count_chdb_handles


def test_reads_whose_clients_all_close_never_close_the_last_chdb_handle(
    ch_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLI read (``run_query``) opens a client and closes it, twice per query: with no other handle open, chDB
    stopped and restarted its engine each time (``synthwatch report``: 25 restarts, 44 -> 169 threads). Counted
    through a wrapper of ``chdb.connect``, from the first client on: the count must not reach zero until the
    process releases the engine. Failed before: it did at the first client's close."""
    release_embedded_engine()  # the session's hold, made before the wrapper: the count starts from nothing
    counts = count_chdb_handles(monkeypatch)
    try:
        connect(ch_settings).close()
        for _ in range(3):
            assert run_query(ch_settings, "SELECT 1").rows == [[1]]
            with pytest.raises(QueryError):
                run_query(ch_settings, "SELECT no_such_column")
        analyst_client(ch_settings).close()
        assert 0 not in counts, f"a read closed the process's last chDB handle (the engine restarted): {counts}"
    finally:
        release_embedded_engine()
    assert counts[-1] == 0, f"released, chDB handles were left open: {counts}"


def test_a_client_on_another_directory_moves_the_hold(ch_settings: Settings, tmp_path: Path) -> None:
    """chDB hosts one engine path per process and refuses another while any handle is open: the hold on the
    session's engine must not stop a process from opening another directory once its own clients are closed."""
    connect(ch_settings).close()  # held now
    other = Settings(data_dir=tmp_path, clickhouse_database="other")
    client = connect(other)
    try:
        assert client.command("SELECT 1") == 1
    finally:
        client.close()
    connect(ch_settings).close()  # and back


def test_a_data_directory_whose_name_holds_a_percent_escape_opens(ch_settings: Settings, tmp_path: Path) -> None:
    """clickhouse-connect gives chDB a ``chdb:///path`` URL's path as written (no percent-decoding); the hold must
    name the same path, or chDB refuses it as a second engine path and every client fails. Failed before: the hold
    decoded ``%41`` to ``A`` and no command could open a data directory named ``a%41b``."""
    settings = Settings(data_dir=tmp_path / "a%41b", clickhouse_database="other")
    client = connect(settings)
    try:
        assert client.command("SELECT 1") == 1
    finally:
        client.close()
    assert run_query(settings, "SELECT 2").rows == [[2]]
    assert not (tmp_path / "aAb").exists()
    connect(ch_settings).close()  # the session's engine held again


def test_an_engine_server_in_this_process_opens_after_clients_on_another_directory(
    ch_settings: Settings, tmp_path: Path
) -> None:
    """The engine server (:class:`Engine`) opens chDB itself; the hold a client on another directory left must not
    stop it (chDB hosts one engine path per process). Failed before: chDB refused the server's path (Code 36)
    whenever an earlier test had opened a directory of its own in the pytest process."""
    connect(Settings(data_dir=tmp_path / "other", clickhouse_database="other")).close()  # the hold is there now
    engine = Engine(ch_settings.embedded_clickhouse_path, tmp_path)
    try:
        with engine.handle({}) as handle:
            assert handle.connection.query("SELECT 1", "TabSeparated").bytes() == b"1\n"
    finally:
        engine.close()
    connect(ch_settings).close()  # the session's engine held again


def test_a_scratch_directory_goes_only_after_its_engine_stopped(
    ch_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A benchmark's engine in a temporary directory: held for the process's life, the engine went on merging there
    after its last client closed, and removing the directory failed ('Directory not empty: tmp_merge_...', the
    memory benchmark one run in six). The engine must have stopped (no chDB handle left) when the directory goes."""
    release_embedded_engine()  # the session's hold: the count starts from nothing
    counts = count_chdb_handles(monkeypatch)
    with engine_scratch_directory("synthwatch-test-scratch-") as tmp:
        client = connect(Settings(data_dir=tmp, clickhouse_database="scratch"))
        client.command("CREATE TABLE parts (n UInt64) ENGINE = MergeTree ORDER BY n")
        for n in range(12):  # parts for the background merges
            client.command(f"INSERT INTO parts VALUES ({n})")
        client.close()
        assert counts[-1] > 0, "closing the client stopped the engine: nothing is held"
    assert counts[-1] == 0, f"the directory was removed under a running engine: {counts}"
    assert not tmp.exists()
    connect(ch_settings).close()  # the session's engine, held again
