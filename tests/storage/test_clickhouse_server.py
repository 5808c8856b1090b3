"""The HTTP code path: migrate, store, backfill and read back through clickhouse-connect's HTTP client.

Two targets. A real ClickHouse server when SYNTHWATCH_TEST_CLICKHOUSE_URL=http://user:pass@host:8123 is set
(each run uses a fresh database on that server and drops it afterwards); it skips with that reason otherwise.
And always: the embedded engine (the same ClickHouse code, chDB) answering ClickHouse's HTTP interface in a
process of its own (synthwatch.stack.engine, with its password), so the HTTP client path runs in every `make test` even
where no server is reachable. The second target is not a ClickHouse server: server-only behaviour
(users, clusters, replication) is covered only by the first.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

from synthwatch.settings import Settings
from synthwatch.stack.engine import EngineProcess
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.backfill.ingest import ingest_history
from synthwatch.stream_apps.storage.clickhouse import connect, migrate
from synthwatch.stream_apps.storage.reads import stats, substance_history
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.conftest import engine_over_http
from tests.support.factories import lab, seizure

SERVER = os.environ.get("SYNTHWATCH_TEST_CLICKHOUSE_URL")
pytestmark = [pytest.mark.integration]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineProcess]:
    with engine_over_http(tmp_path / "chdb", tmp_path / "clickhouse-http.log") as engine:
        yield engine


@pytest.fixture(params=["server", "engine-over-http"])
def server_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "server":
        if not SERVER:
            pytest.skip("SYNTHWATCH_TEST_CLICKHOUSE_URL is not set (no ClickHouse server to test)")
        base = SERVER
    else:
        base = request.getfixturevalue("engine").url("default")
    database = f"synthwatch_test_{uuid.uuid4().hex[:8]}"
    url = urlunparse(urlparse(base)._replace(path=f"/{database}"))
    settings = Settings(data_dir=tmp_path, clickhouse_url=url)
    yield settings
    client = connect(settings)
    try:
        client.command(f"DROP DATABASE IF EXISTS {database}")
    finally:
        client.close()


def test_migrate_store_backfill_and_read_back_over_http(server_settings: Settings, tmp_path: Path) -> None:
    assert not server_settings.clickhouse_is_embedded
    client = connect(server_settings)
    try:
        applied = migrate(client)
        assert applied and migrate(client) == []
        now = datetime.now(UTC)
        records = [seizure(event_id=f"h-s-{i}", occurred_at=(now - timedelta(hours=i)).isoformat()) for i in range(60)]
        records += [lab(event_id=f"h-l-{i}", occurred_at=(now - timedelta(hours=i)).isoformat()) for i in range(40)]
        batch = Intake().process(RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records))
        sink = ClickHouseSink(client)
        assert sink.store_events(batch.events).stored == 100
        assert sink.store_events(batch.events).already_stored == 100
    finally:
        client.close()
    path = tmp_path / "more.ndjson"
    more = [seizure(event_id=f"h-b-{i}", occurred_at=(now - timedelta(days=1, hours=i)).isoformat()) for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in more + records[:10]) + "not json\n")
    summary = ingest_history(server_settings, path, progress=False, workers=0)
    print(f"server backfill: {summary}")
    assert (summary.stored, summary.already_stored, summary.rejected) == (30, 10, 1)

    rows = stats(server_settings, days=7)
    assert sum(r.reports for r in rows) == 130
    history = substance_history(server_settings, "tramadol")
    assert history is not None and history.reports == 90 and history.regions[0].region == "ML-BKO"
    print(f"read back over HTTP: {len(rows)} stats rows, tramadol {history.reports} reports")
