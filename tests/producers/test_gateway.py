"""The HTTP intake gateway: tokens, limits and verdicts, against a running ``synthwatch gateway`` process.

The integration tests start a real worker (signed reports required) and a real gateway on the session's Tansu
broker and talk to the gateway with httpx, so what is checked is what a LIMS would see, down to the worker
storing what the gateway signed.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from synthwatch.producers.gateway import BodyError, GatewayConfigError, RateLimiter, check_listen_address, records_of
from synthwatch.producers.gateway_tokens import TokenStore, TokenStoreError
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker
from tests.conftest import (
    RunningWorker,
    cli_env,
    isolated_settings,
    run_cli,
    start_worker,
    stop_worker,
    terminate,
    wait_until,
)
from tests.support.factories import lab, seizure

# --- pure parts -------------------------------------------------------------------------------------------


def test_rate_limiter_allows_a_burst_then_paces_and_says_how_long_to_wait() -> None:
    now = [100.0]
    limiter = RateLimiter(per_minute=6, burst=2, clock=lambda: now[0])  # one request per 10 s
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(10.0)
    assert limiter.take("b") == 0  # buckets are per key
    now[0] += 5
    assert limiter.take("a") == pytest.approx(5.0)
    now[0] += 5
    assert limiter.take("a") == 0
    assert limiter.wait("a") == pytest.approx(10.0) and limiter.wait("a") == pytest.approx(10.0)  # takes nothing
    now[0] += 10
    assert limiter.wait("a", 2) == pytest.approx(10.0) and limiter.wait("a") == 0 and limiter.take("a") == 0


def test_tokens_are_stored_hashed_in_a_private_file_and_revocation_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = TokenStore.open(path)
    token, secret = store.create("lab-fr", ["LAB-FR-01"], [], note="LIMS of the Paris lab")
    assert secret.startswith("swg_") and len(secret) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret not in path.read_text() and secret not in repr(token)
    gateway_view = TokenStore.open(path)  # another process's view of the same file
    assert gateway_view.authenticate(secret) == token
    assert gateway_view.authenticate(secret + "x") is None
    store.revoke(token.token_id)
    gateway_view.reload_if_changed()
    assert gateway_view.authenticate(secret) is None
    assert not gateway_view.tokens[token.token_id].active  # kept on record
    with pytest.raises(TokenStoreError, match="tokens list"):
        store.revoke("nope")
    with pytest.raises(TokenStoreError, match="--lab-id or --agency"):
        store.create("lab-fr", [], [])
    path.chmod(0o644)
    with pytest.raises(TokenStoreError, match="chmod 600"):
        TokenStore.open(path)
    path.chmod(0o660)  # its group could replace the hashes with its own
    with pytest.raises(TokenStoreError, match="chmod 600"):
        TokenStore.open(path)
    path.chmod(0o440)  # a Kubernetes Secret mounted with fsGroup (deploy/k8s/gateway.yaml): read-only, group read
    assert TokenStore.open(path).authenticate(secret) is None  # opened; the token is still revoked


def _kubelet_update(mount: Path, name: str, content: bytes, version: str) -> None:
    """Write a Secret the way the kubelet does: files in a new timestamped directory (0440), then the
    ``..data`` link swapped to it atomically; the file the pod reads is a link through ``..data``."""
    directory = mount / f"..{version}"
    directory.mkdir()
    (directory / name).write_bytes(content)
    (directory / name).chmod(0o440)
    (mount / "..data_tmp").symlink_to(directory.name)
    (mount / "..data_tmp").replace(mount / "..data")
    if not (mount / name).is_symlink():
        (mount / name).symlink_to(f"..data/{name}")


def test_a_token_revoked_in_a_kubernetes_secret_is_refused_once_the_kubelet_swaps_the_file(tmp_path: Path) -> None:
    """deploy/k8s/gateway.yaml: the gateway reads its token hashes from a Secret mount (0440, group read);
    the operator revokes with the CLI on a copy and replaces the Secret, and no restart is needed."""
    operator_copy = tmp_path / "gateway-tokens.json"
    operators = TokenStore.open(operator_copy)
    kept, kept_secret = operators.create("lab-fr", ["LAB-FR-01"], [])
    leaked, leaked_secret = operators.create("lab-ml", ["LAB-ML-01"], [])
    mount = tmp_path / "mount"
    mount.mkdir()
    _kubelet_update(mount, operator_copy.name, operator_copy.read_bytes(), "2026_12_06_10_00_00.1")
    gateway_view = TokenStore.open(mount / operator_copy.name)
    assert gateway_view.authenticate(leaked_secret) == leaked

    operators.revoke(leaked.token_id)
    _kubelet_update(mount, operator_copy.name, operator_copy.read_bytes(), "2026_12_06_10_05_00.2")
    gateway_view.reload_if_changed()
    assert gateway_view.authenticate(leaked_secret) is None
    assert gateway_view.authenticate(kept_secret) == kept


def test_a_token_is_bound_to_its_lab_ids_and_agencies(tmp_path: Path) -> None:
    token, _ = TokenStore.open(tmp_path / "t.json").create("lab-fr", ["LAB-FR-01"], [])
    assert token.permits("LAB-FR-01", None) is None
    refused = token.permits("LAB-DE-07", None)
    assert refused is not None and refused.startswith("auth: not_permitted") and "'LAB-DE-07'" in refused
    assert token.permits(None, "Douanes maliennes") is not None


def test_json_bodies_give_one_record_per_element_and_a_clear_error_when_unreadable() -> None:
    records = records_of(json.dumps([lab(), 3, "x"]), "json", "req", Settings())
    assert [r.source for r in records] == ["req:1", "req:2", "req:3"]
    assert json.loads(records[0].raw) == lab() and records[0].problem is None
    assert records[1].problem is not None and "element 2 is a JSON int" in records[1].problem
    assert len(records_of(json.dumps(lab()), "json", "req", Settings())) == 1  # one object is one record
    with pytest.raises(BodyError, match="not JSON"):
        records_of('[{"a": 1}', "json", "req", Settings())
    # a UTF-8 BOM (Windows tools write one) is dropped, as by the NDJSON and CSV readers: it was a 400
    assert [r.source for r in records_of("\ufeff" + json.dumps([lab()]), "json", "req", Settings())] == ["req:1"]
    # the array is read one element at a time (never built whole): the same answers as json.loads
    assert records_of(" [ ] ", "json", "req", Settings()) == []
    assert [json.loads(r.raw) for r in records_of(' [ {"a": 1} ,\n{"b": [2]} ]\n', "json", "req", Settings())] == [
        {"a": 1},
        {"b": [2]},
    ]
    for broken in ("[1,]", "[1 2]", '{"a": 1} x', "[1] 2", "", "[" * 100_000):
        with pytest.raises(BodyError, match="not JSON"):
            records_of(broken, "json", "req", Settings())


def test_a_json_body_is_held_as_its_records_text_and_an_element_is_decoded_within_the_record_limit() -> None:
    """An 8 MiB body of elements of 271 empty objects each (~840 bytes) was held as ~190 MiB of objects until
    published (two requests read at once: ~400 MiB, the pod's limit is 1 GiB), as was one 8 MiB element: the
    records are their text now, parsed one at a time when judged, and an element not complete within the
    record size limit makes the body unreadable (400, nothing published) without being decoded whole."""
    import tracemalloc

    element = '{"a": [' + "{}, " * 270 + "{}]}"
    body = "[" + ",".join([element] * 9_900) + "]"
    tracemalloc.start()
    try:
        records = records_of(body, "json", "req", Settings())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30 * 2**20, f"{peak / 2**20:.0f} MiB"  # the text again, not its objects
    assert len(records) == 9_900 and all(r.obj is None for r in records)
    with pytest.raises(BodyError, match="not complete within 921,600 characters"):
        records_of('[{"a": "' + "x" * 1_000_000 + '"}]', "json", "req", Settings())
    assert len(records_of('[{"a": "' + "x" * 900_000 + '"}]', "json", "req", Settings())) == 1
    number = "1." + "0" * 5_000  # ends past the first window: read whole, not cut at the window's end
    assert [r.raw for r in records_of(f"[{number}, 2]", "json", "req", Settings())] == ["1.0", "2"]


def test_a_json_body_refused_for_one_element_says_which_element_and_what_to_do() -> None:
    """One oversized element makes the whole body 400 (it is not decoded whole): the LIMS developer is told
    which element, that nothing was published and what to send; the answer said 'not complete within
    921,600 characters' from a character offset only, and a broken element was named by character only."""
    small = json.dumps(lab())
    body = "[" + ",".join([small, '{"a": "' + "x" * 1_000_000 + '"}', small]) + "]"
    with pytest.raises(BodyError) as refused:
        records_of(body, "json", "req", Settings())
    message = str(refused.value)
    assert f"element 2 of the array (from character {len(small) + 2:,}) is not complete within 921,600" in message
    assert "nothing of this request was published" in message and "that element (or leave it out)" in message
    with pytest.raises(BodyError, match=r"in element 2 of the array\); .*nothing of this request was published"):
        records_of(f'[{small}, {{"a": tru}}, {small}]', "json", "req", Settings())


def test_a_non_loopback_address_needs_tls_or_a_tls_proxy(tmp_path: Path) -> None:
    check_listen_address(Settings(gateway_host="127.0.0.1"))
    with pytest.raises(GatewayConfigError, match="in clear"):
        check_listen_address(Settings(gateway_host="0.0.0.0"))
    check_listen_address(Settings(gateway_host="0.0.0.0", gateway_behind_tls_proxy=True))
    with pytest.raises(GatewayConfigError, match="both"):
        check_listen_address(Settings(gateway_host="0.0.0.0", gateway_ssl_certfile=tmp_path / "c.pem"))


def test_the_openapi_description_covers_the_routes_and_bodies() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "synthwatch.cli.main", "gateway", "--openapi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["paths"]) == {"/v1/reports", "/v1/whoami"}
    post = document["paths"]["/v1/reports"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/x-ndjson", "application/json", "text/csv"}
    assert {"200", "401", "413", "415", "429"} <= set(post["responses"])
    # a LIMS developer reads the limits here, with what to do on 413
    assert "(10,000 here): split the batch" in post["responses"]["413"]["description"]
    # and what a 400 or a 429 means for the batch: nothing of it published, what to send again
    assert (
        "JSON element longer than SYNTHWATCH_MAX_RECORD_BYTES (921,600 here)" in post["responses"]["400"]["description"]
    )
    assert "more than 8 of its requests in flight: nothing was published" in post["responses"]["429"]["description"]
    unlisted = document["components"]["schemas"]["IntakeResult"]["properties"]["unlisted"]["description"]
    assert "send the whole request again" in unlisted  # which unlisted ones were not accepted is not said
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# --- against the running gateway -----------------------------------------------------------------------------

KEY_FR, KEY_ML = bytes(range(32)), bytes(range(100, 132))


@dataclass
class Gateway:
    url: str
    settings: Settings
    worker: RunningWorker
    log_path: Path
    process: subprocess.Popen[bytes]

    def token(self, org: str = "lab-fr") -> str:
        """A fresh token (per test, so rate limits of one test do not touch another)."""
        binding = (["LAB-FR-01"], []) if org == "lab-fr" else ([], ["Douanes maliennes"])
        return TokenStore.open(self.settings.resolved_gateway_tokens_file).create(org, *binding)[1]

    def post(self, token: str | None, body: str | bytes, content_type: str, **headers: str) -> httpx.Response:
        sent = {"Content-Type": content_type, **headers}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return httpx.post(f"{self.url}/v1/reports", content=body, headers=sent, timeout=60)


@pytest.fixture(scope="module")
def gateway(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A worker that requires signed reports, and a gateway holding the same organisation keys."""
    base = tmp_path_factory.mktemp("gateway")
    keys = base / "orgs.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "organisations": {
                    "lab-fr": {"keys": [KEY_FR.hex()], "lab_ids": ["LAB-FR-01"]},
                    "douane-ml": {"keys": [KEY_ML.hex()], "agencies": ["Douanes maliennes"]},
                }
            }
        )
    )
    keys.chmod(0o600)
    settings = isolated_settings(
        broker,
        base / "data",
        org_keys_file=keys,
        gateway_port=0,
        gateway_max_body_bytes=64 * 1024,
        gateway_rate_per_minute=1,  # one request a minute after the burst: no test is near that slow
        gateway_rate_burst=8,
    )
    worker = start_worker(settings, base / "worker.log")
    log_path = base / "gateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "synthwatch.cli.main", "gateway"], env=cli_env(settings), stdout=log, stderr=log
        )

    def listening() -> str | None:
        if process.poll() is not None:
            pytest.fail(f"the gateway exited with {process.returncode}:\n{log_path.read_text()}")
        found = re.search(r"gateway listening on (http://\S+:\d+)", log_path.read_text())
        return found.group(1) if found else None

    try:
        url = wait_until(listening, 60, "the gateway to listen")
        yield Gateway(url, settings, worker, log_path, process)
    finally:
        terminate(process)
        stop_worker(worker)


@pytest.mark.integration
def test_mixed_records_get_a_verdict_each_and_the_worker_stores_the_accepted(gateway: Gateway) -> None:
    token = gateway.token()
    records = [
        json.dumps(lab(event_id="gw-ok-1")),
        json.dumps(lab(event_id="gw-ok-2", region="FR-69")),
        '{"event_id": "gw-trunc", "kind": "lab_det',
        json.dumps(lab(event_id="gw-other-lab", lab_id="LAB-DE-07")),  # another lab's id: refused
        json.dumps(lab(event_id="gw-ok-1")),  # again in the same request
        json.dumps(lab(event_id="gw-bad-region", region="XX-99")),
    ]
    response = gateway.post(token, "\n".join(records) + "\n", "application/x-ndjson")
    assert response.status_code == 200, response.text
    result = response.json()
    verdicts = [(r["position"], r["event_id"], r["verdict"]) for r in result["records"]]
    assert verdicts == [  # accepted records (1 and 2) are not listed: the counts say how many
        (3, None, "rejected"),
        (4, "gw-other-lab", "rejected"),
        (5, "gw-ok-1", "duplicate"),
        (6, "gw-bad-region", "rejected"),
    ]
    reasons = {r["position"]: r["reason"] for r in result["records"]}
    assert "invalid JSON" in reasons[3]
    assert reasons[4].startswith("auth: not_permitted") and "'LAB-DE-07'" in reasons[4]
    assert "region" in reasons[6]
    assert (result["received"], result["accepted"], result["rejected"], result["duplicates"], result["failed"]) == (
        6,
        2,
        3,
        1,
        0,
    )
    assert result["org_id"] == "lab-fr"

    # the worker (signatures required) stored exactly the accepted records: the gateway signed them as lab-fr
    stored = gateway.worker.wait_rows(
        "SELECT event_id FROM lab_detections WHERE event_id LIKE 'gw-%%' ORDER BY event_id",
        {},
        2,
        "the accepted records in ClickHouse",
        timeout=90,
    )
    assert [r["event_id"] for r in stored] == ["gw-ok-1", "gw-ok-2"]
    rejects = gateway.worker.wait_rows(
        "SELECT source, reason FROM rejects WHERE source LIKE %(src)s ORDER BY source",
        {"src": f"gateway/lab-fr/{result['request_id']}:%"},
        3,
        "the refused records in the rejects table",
    )
    assert [r["source"].rsplit(":", 1)[1] for r in rejects] == ["3", "4", "6"]
    assert gateway.worker.count("SELECT count() FROM rejects WHERE stage = 'auth'") == 0  # no bad signature

    # the same record sent again later: a duplicate, not produced again
    again = gateway.post(token, records[0] + "\n", "application/x-ndjson").json()
    assert again["records"][0]["verdict"] == "duplicate" and again["duplicates"] == 1


@pytest.mark.integration
def test_csv_and_json_bodies(gateway: Gateway) -> None:
    token = gateway.token("douane-ml")
    csv_body = (
        "event_id,kind,occurred_at,country,region,substance.name,agency,seizure_id,border_point,conveyance,"
        "quantity.value,quantity.unit\r\n"
        "gw-csv-1,border_seizure,2026-03-01T10:00:00+01:00,ML,ML-BKO,Tramadol,Douanes maliennes,S1,BKO,air,2.5,kg\r\n"
        "gw-csv-2,border_seizure,2026-03-01T10:00:00+01:00,ML,ML-BKO,Tramadol,Douanes sénégalaises,S2,BKO,air,1,kg\r\n"
        "gw-csv-3,border_seizure,2026-03-01T10:00:00+01:00,ML,ML-BKO,Tramadol,Douanes maliennes,S3,BKO,air,-1,kg\r\n"
    )
    result = gateway.post(token, csv_body.encode(), "text/csv; charset=utf-8").json()
    assert result["accepted"] == 1 and [(r["position"], r["verdict"]) for r in result["records"]] == [
        (3, "rejected"),
        (4, "rejected"),
    ], result["records"]
    assert "may not report as agency 'Douanes sénégalaises'" in result["records"][0]["reason"]
    assert "quantity.value" in result["records"][1]["reason"]
    # the same file as a Latin-1 LIMS export: decoded by its charset, so the first row is the record just accepted
    latin = gateway.post(token, csv_body.encode("latin-1"), "text/csv; charset=ISO-8859-1").json()
    assert [r["verdict"] for r in latin["records"]] == ["duplicate", "rejected", "rejected"], latin["records"]
    assert "'Douanes sénégalaises'" in latin["records"][1]["reason"]

    array = [seizure(event_id="gw-json-1"), seizure(event_id="gw-json-2", agency="Other"), 7]
    result = gateway.post(token, json.dumps(array), "application/json").json()
    assert result["accepted"] == 1 and [r["verdict"] for r in result["records"]] == ["rejected", "rejected"]
    assert result["received"] == result["accepted"] + result["rejected"] + result["duplicates"] + result["failed"]
    stored = gateway.worker.wait_rows(
        "SELECT event_id FROM border_seizures WHERE event_id LIKE 'gw-%%' ORDER BY event_id",
        {},
        2,
        "the accepted seizures in ClickHouse",
        timeout=90,
    )
    assert [r["event_id"] for r in stored] == ["gw-csv-1", "gw-json-1"]


@pytest.mark.integration
def test_wrong_missing_and_revoked_tokens_are_refused_and_never_logged(gateway: Gateway) -> None:
    body = json.dumps(lab(event_id="gw-never")) + "\n"
    token = gateway.token()
    for presented in (None, "swg_not-a-token", token + "x"):
        response = gateway.post(presented, body, "application/x-ndjson")
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    whoami = httpx.get(f"{gateway.url}/v1/whoami", headers={"Authorization": f"Bearer {token}"}).json()
    assert {k: v for k, v in whoami.items() if k != "token_id"} == {
        "org_id": "lab-fr",
        "lab_ids": ["LAB-FR-01"],
        "agencies": [],
    }
    token_id = whoami["token_id"]
    revoked = run_cli(gateway.settings, "tokens", "revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert gateway.post(token, body, "application/x-ndjson").status_code == 401  # the running gateway re-read it
    # the OpenAPI description is for token holders too
    assert httpx.get(f"{gateway.url}/v1/openapi.json").status_code == 401
    fresh = gateway.token()
    assert httpx.get(f"{gateway.url}/v1/openapi.json", headers={"Authorization": f"Bearer {fresh}"}).status_code == 200
    log = gateway.log_path.read_text()
    assert token not in log and fresh not in log and "swg_not-a-token" not in log


@pytest.mark.integration
def test_oversized_body_wrong_content_type_and_foreign_host_are_refused(gateway: Gateway) -> None:
    token = gateway.token()
    big = (json.dumps(lab(event_id="gw-big")) + "\n") * 400  # ~150 KB, over the 64 KiB limit
    response = gateway.post(token, big, "application/x-ndjson")
    assert response.status_code == 413 and "65,536" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(400):
            yield (json.dumps(lab(event_id="gw-big")) + "\n").encode()

    streamed = httpx.post(
        f"{gateway.url}/v1/reports",
        content=chunks(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
    )
    assert streamed.status_code == 413
    assert gateway.post(token, "x", "text/plain").status_code == 415
    assert gateway.post(token, "x", "text/csv; charset=klingon").status_code == 415
    assert gateway.post(token, "{}", "application/json", Host="evil.example").status_code == 400
    assert gateway.worker.count("SELECT count() FROM lab_detections WHERE event_id = 'gw-big'") == 0


@pytest.mark.integration
def test_a_token_over_its_rate_gets_429_with_retry_after(gateway: Gateway) -> None:
    token, other = gateway.token(), gateway.token()
    statuses = [httpx.get(f"{gateway.url}/v1/whoami", headers={"Authorization": f"Bearer {token}"}) for _ in range(9)]
    assert [r.status_code for r in statuses] == [200] * 8 + [429]  # burst 8, then one a minute
    assert 1 <= int(statuses[-1].headers["Retry-After"]) <= 60
    assert "retry after" in statuses[-1].json()["detail"]
    assert httpx.get(f"{gateway.url}/v1/whoami", headers={"Authorization": f"Bearer {other}"}).status_code == 200


@pytest.mark.integration
def test_tokens_cli_prints_the_secret_once_and_lists_no_secret(gateway: Gateway) -> None:
    created = run_cli(gateway.settings, "tokens", "create", "--org", "douane-ml", "--note", "customs LIMS")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("swg_") and "Douanes maliennes" in created.stderr  # bindings from the keys file
    listed = run_cli(gateway.settings, "tokens", "list")
    assert listed.returncode == 0 and "douane-ml" in listed.stdout and "customs LIMS" in listed.stdout
    assert secret not in listed.stdout and secret not in gateway.settings.resolved_gateway_tokens_file.read_text()
    refused = run_cli(gateway.settings, "tokens", "create", "--org", "lab-fr", "--lab-id", "LAB-DE-07")
    assert refused.returncode == 1 and "may not report as 'LAB-DE-07'" in refused.stderr
    unknown = run_cli(gateway.settings, "tokens", "create", "--org", "lab-xx", "--lab-id", "X")
    assert unknown.returncode == 1 and "not in" in unknown.stderr
    response = gateway.post(secret, json.dumps(seizure(event_id="gw-cli-1")) + "\n", "application/x-ndjson")
    assert response.json()["accepted"] == 1


@pytest.mark.integration
def test_a_token_of_an_organisation_without_a_signing_key_is_refused_not_produced(gateway: Gateway) -> None:
    """The worker requires signed reports: records the gateway cannot sign would all be rejected there."""
    from synthwatch.stack.broker import high_watermarks

    settings = gateway.settings
    topics = (settings.topic_lab_detections, settings.topic_rejects)
    before = high_watermarks(settings.kafka_bootstrap_servers or "", topics)
    _, secret = TokenStore.open(settings.resolved_gateway_tokens_file).create("lab-xx", ["LAB-XX"], [])
    response = gateway.post(secret, json.dumps(lab(event_id="gw-unsignable", lab_id="LAB-XX")), "application/json")
    assert response.status_code == 403 and "no key in the organisation keys file" in response.json()["detail"]
    assert high_watermarks(settings.kafka_bootstrap_servers or "", topics) == before  # nothing produced


@pytest.mark.integration
def test_records_kafka_did_not_acknowledge_are_failed_not_accepted(own_broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A broker that dies mid-way: every record gets a verdict, none is called accepted without an ack."""
    from synthwatch.producers.gateway import GatewayPublisher
    from synthwatch.producers.readers import InputRecord

    settings = isolated_settings(own_broker, tmp_path / "data")
    token, _ = TokenStore.open(tmp_path / "tokens.json").create("lab-fr", ["LAB-FR-01"], [])
    quick = {"request_timeout_ms": 1000, "delivery_timeout_ms": 3000, "max_block_ms": 3000, "retries": 1}
    publisher = GatewayPublisher(settings, own_broker.bootstrap_servers, None, **quick)
    try:
        first = publisher.publish_request(token, [InputRecord("r:1", json.dumps(lab(event_id="gw-up")))]).records
        assert [(p.event_id, p.verdict) for p in first] == [("gw-up", "accepted")]
        own_broker.stop()
        records = [
            InputRecord("r:1", json.dumps(lab(event_id="gw-down-1"))),
            InputRecord("r:2", json.dumps(lab(event_id="gw-down-2"))),
            InputRecord("r:3", "{not json"),
        ]
        verdicts = publisher.publish_request(token, records).records
    finally:
        publisher.producer.close(timeout=0)
    assert [(p.position, p.event_id, p.verdict) for p in verdicts] == [
        (1, "gw-down-1", "failed"),
        (2, "gw-down-2", "failed"),
        (3, None, "rejected"),
    ]
    assert all("send it again" in (p.reason or "") for p in verdicts[:2])


@pytest.mark.integration
def test_a_report_placed_outside_the_organisations_countries_is_rejected_at_the_gateway(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The worker refuses a report an organisation places outside its ``countries`` (keys file): the gateway, which
    holds the same file, says so in the lab's verdict instead of answering "accepted" for a report then refused."""
    from synthwatch.producers.gateway import GatewayPublisher
    from synthwatch.producers.readers import InputRecord
    from synthwatch.schemas.envelope import Organisation

    org = Organisation("lab-fr", (KEY_FR,), frozenset({"LAB-FR-01"}), frozenset(), frozenset({"FR"}))
    settings = isolated_settings(broker, tmp_path / "data")
    token, _ = TokenStore.open(tmp_path / "tokens.json").create("lab-fr", ["LAB-FR-01"], [])
    publisher = GatewayPublisher(settings, broker.bootstrap_servers, {"lab-fr": org})
    try:
        records = [
            InputRecord("r:1", json.dumps(lab(event_id="gw-in-fr"))),
            InputRecord("r:2", json.dumps(lab(event_id="gw-in-ml", country="ML", region="ML-BKO"))),
        ]
        verdicts = publisher.publish_request(token, records).records
    finally:
        publisher.close()
    assert [(p.event_id, p.verdict, p.reason) for p in verdicts] == [
        ("gw-in-fr", "accepted", None),
        (
            "gw-in-ml",
            "rejected",
            "auth: not_permitted: organisation 'lab-fr' may not report for country 'ML' (its countries: FR)",
        ),
    ]


# --- the application in this process (real app, real publisher, real broker) -----------------------------------


@dataclass
class InProcess:
    client: Any
    settings: Settings
    secret: str

    def post(self, body: str | bytes, content_type: str = "application/x-ndjson") -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": content_type}
        return self.client.post("/v1/reports", content=body, headers=headers)

    def topic_size(self, topic: str) -> int:
        from synthwatch.stack.broker import high_watermarks

        return sum(high_watermarks(self.settings.kafka_bootstrap_servers or "", [topic]).values())


def bodies_counted(app: Any, received: list[int]) -> Any:
    """``app`` counting, in ``received[0]``, the request bodies it has received whole: a request is then in the
    gateway's hands (waiting its turn, or read), which a test can wait for instead of sleeping."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def counting_receive() -> Any:
            message = await receive()
            received[0] += message["type"] == "http.request" and not message.get("more_body")
            return message

        await app(scope, counting_receive, send)

    return asgi


@contextmanager
def in_process(
    broker: EmbeddedBroker, tmp_path: Path, labs: tuple[str, ...] = ("LAB-FR-01",), **overrides: Any
) -> Iterator[InProcess]:
    """``create_app`` with a ``GatewayPublisher`` on the session broker, served by Starlette's test client; its
    token reports as ``labs``."""
    from fastapi.testclient import TestClient

    from synthwatch.producers.gateway import GatewayPublisher, create_app

    settings = isolated_settings(broker, tmp_path / "data", **overrides)
    store = TokenStore.open(tmp_path / "tokens.json")
    _, secret = store.create("lab-fr", list(labs), [])
    publisher = GatewayPublisher(settings, broker.bootstrap_servers, None)
    try:
        with TestClient(create_app(settings, store, publisher.publish_request), base_url="http://localhost") as client:
            yield InProcess(client, settings, secret)
    finally:
        publisher.close()


@pytest.mark.integration
def test_a_body_of_more_records_than_the_cap_is_refused_whole_and_a_full_one_is_answered_in_bounded_size(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """One 8 MiB body of b"1\\n" lines was 4 million records, verdicts and rejects (6 GiB, a 379 MiB answer):
    records are capped per request (the default cap, proved with a body just above it), nothing of a refused
    body is published, and a full body's answer lists only a bounded number of the records not accepted."""
    # the three refused bodies' records read (3 x 10,001) are charged: a bucket that still holds a full request
    with in_process(broker, tmp_path, gateway_rate_records_burst=50_000) as gateway:
        cap = 10_000  # the default of SYNTHWATCH_GATEWAY_MAX_RECORDS
        topics = (gateway.settings.topic_lab_detections, gateway.settings.topic_rejects)
        for body, content_type in [
            (b"1\n" * (cap + 1), "application/x-ndjson"),
            ("[" + ",".join(["1"] * (cap + 1)) + "]", "application/json"),
            ("event_id,kind\n" + "x,lab_detection\n" * (cap + 1), "text/csv"),
        ]:
            response = gateway.post(body, content_type)
            assert response.status_code == 413, (content_type, response.text[:300])
            assert "10,000 records" in response.json()["detail"] and "split the batch" in response.json()["detail"]
        assert sum(gateway.topic_size(t) for t in topics) == 0  # nothing published, not even a reject

        response = gateway.post(b"1\n" * cap)
        assert response.status_code == 200
        assert len(response.content) < 300_000  # 1,000 listed verdicts, not 10,000
        result = response.json()
        assert (result["received"], result["accepted"], result["rejected"], result["duplicates"]) == (cap, 0, cap, 0)
        listed = gateway.settings.gateway_max_listed_verdicts
        assert len(result["records"]) == listed and result["unlisted"] == cap - listed
        assert [r["position"] for r in result["records"][:3]] == [1, 2, 3]
        # rejects sent per request are bounded too; the rest are counted, and the counts say so
        sent = gateway.settings.gateway_max_rejects_sent
        assert result["rejects_unrecorded"] == cap - sent
        assert gateway.topic_size(gateway.settings.topic_rejects) == sent


@pytest.mark.integration
def test_a_batch_refused_for_its_size_is_told_both_limits_and_that_a_csv_part_needs_its_header(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A customs officer's spreadsheet export over the limits: the 413 said 'at most 2,048: split it' (bytes,
    not the records cap) and, over the records cap, nothing about the header, so the parts after the first were
    sent without one and each had its first row read as the header and every other row refused."""
    header = "event_id,kind,occurred_at,country,region,lab_id,substance.name\n"
    row = "LAB-FR-01:S{n},lab_detection,2026-03-02T10:00:00Z,FR,FR-75C,LAB-FR-01,mephedrone\n"
    with in_process(broker, tmp_path, gateway_max_body_bytes=2048, gateway_max_records=20) as gateway:
        too_big = gateway.post(header + "".join(row.format(n=n) for n in range(40)), "text/csv")
        assert too_big.status_code == 413, too_big.text
        detail = too_big.json()["detail"]
        assert "at most 2,048 (SYNTHWATCH_GATEWAY_MAX_BODY_BYTES): split the batch into requests of at most" in detail
        assert "2,048 bytes and 20 records, each beginning with the CSV header row" in detail
        assert "nothing of this request was published" in detail
        too_many = gateway.post(
            header + "".join(row.format(n=n) for n in range(21)).replace("LAB-FR-01:", ""), "text/csv"
        )
        assert too_many.status_code == 413, too_many.text
        assert "requests of at most 20 records, each beginning with the CSV header row" in too_many.json()["detail"]
        ndjson = gateway.post("1\n" * 21)
        assert ndjson.status_code == 413 and "CSV" not in ndjson.json()["detail"]


@pytest.mark.integration
def test_accepted_records_are_not_listed_and_the_counts_add_up(broker: EmbeddedBroker, tmp_path: Path) -> None:
    with in_process(broker, tmp_path) as gateway:
        body = "\n".join(
            [json.dumps(lab(event_id="ip-ok-1")), "{broken", json.dumps(lab(event_id="ip-ok-2", region="FR-69"))]
        )
        result = gateway.post(body).json()
        assert (result["received"], result["accepted"], result["rejected"], result["unlisted"]) == (3, 2, 1, 0)
        assert [(r["position"], r["verdict"]) for r in result["records"]] == [(2, "rejected")]
        assert gateway.topic_size(gateway.settings.topic_lab_detections) == 2


@pytest.mark.integration
def test_the_rate_bucket_is_charged_per_record_not_per_request(broker: EmbeddedBroker, tmp_path: Path) -> None:
    overrides = {"gateway_max_records": 50, "gateway_rate_records_per_minute": 1.0, "gateway_rate_records_burst": 50}
    with in_process(broker, tmp_path, **overrides) as gateway:
        full = "\n".join(json.dumps(lab(event_id=f"rate-{n}")) for n in range(50))
        assert gateway.post(full).json()["accepted"] == 50
        refused = gateway.post(json.dumps(lab(event_id="rate-over")))  # one more record: over the bucket
        assert refused.status_code == 429, refused.text
        assert "record rate" in refused.json()["detail"] and int(refused.headers["Retry-After"]) >= 1
        # with its bucket empty, a token's next body is not even read (no parse, no turn): 429, not 413
        unread = gateway.post(b"1\n" * 51)
        assert unread.status_code == 429 and "nothing was read" in unread.json()["detail"], unread.text
        assert gateway.topic_size(gateway.settings.topic_lab_detections) == 50


@pytest.mark.integration
def test_a_changed_record_under_an_earlier_event_id_is_rejected_as_the_rejects_topic_says(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The gateway said "duplicate" while the publisher refused the record (another text, same id) and sent a
    reject: the verdict is now the publisher's decision, and the counts match the rejects topic."""
    with in_process(broker, tmp_path) as gateway:
        first = lab(event_id="e-1", purity_pct=40.0)
        body = "\n".join([json.dumps(first), json.dumps({**first, "purity_pct": 41.0}), json.dumps(first)])
        result = gateway.post(body).json()
        assert (result["accepted"], result["rejected"], result["duplicates"]) == (1, 1, 1), result
        by_position = {r["position"]: r for r in result["records"]}
        assert by_position[2]["verdict"] == "rejected" and "different content" in by_position[2]["reason"]
        assert by_position[3]["verdict"] == "duplicate"  # the same text again: not sent, nothing refused
        assert gateway.topic_size(gateway.settings.topic_rejects) == result["rejected"] == 1


@pytest.mark.integration
def test_two_labs_reports_under_one_event_id_in_one_body_are_both_accepted(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Event ids are unique per reporter only (the worker judges by lab_id and id): an organisation's two labs
    number their samples alike. The publisher refused the second lab's report as the first's 'changed' one."""
    with in_process(broker, tmp_path, labs=("LAB-FR-01", "LAB-FR-02")) as gateway:
        one, other = lab(event_id="two-labs-1"), lab(event_id="two-labs-1", lab_id="LAB-FR-02")
        result = gateway.post("\n".join([json.dumps(one), json.dumps(other), json.dumps(other)])).json()
        assert (result["accepted"], result["rejected"], result["duplicates"]) == (2, 0, 1), result
        assert gateway.topic_size(gateway.settings.topic_lab_detections) == 2
        changed = gateway.post(
            json.dumps({**other, "event_id": "two-labs-2"})
            + "\n"
            + json.dumps({**other, "event_id": "two-labs-2", "purity_pct": 12.0})
        ).json()  # the same lab's id with other content: still a changed report
        assert (changed["accepted"], changed["rejected"]) == (1, 1), changed


@pytest.mark.integration
def test_a_stray_quote_in_a_csv_row_costs_that_row_only(broker: EmbeddedBroker, tmp_path: Path) -> None:
    with in_process(broker, tmp_path) as gateway:
        header = "event_id,kind,occurred_at,country,region,substance.name,lab_id,sample_id,sample_type,method\n"
        names = {2: '"abc'}  # a stray quote: the plain csv reader took every later line into this cell
        rows = [
            f"csvq-{n},lab_detection,2026-03-01T10:00:00Z,FR,FR-75C,{names.get(n, 'Tramadol')},LAB-FR-01,"
            f"S-{n},seized_material,GC-MS\n"
            for n in range(1, 101)
        ]
        result = gateway.post(header + "".join(rows), "text/csv").json()
        assert (result["received"], result["accepted"], result["rejected"]) == (100, 99, 1), result["records"]
        assert result["records"][0]["position"] == 3 and "quote" in result["records"][0]["reason"]


@pytest.mark.integration
def test_two_requests_are_read_and_published_at_once_one_per_token_and_others_go_ahead(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read records are ~10-15 MiB a maximal request beyond its body: with no bound, every request in flight
    held them while the serial publisher made it wait (16 maximal requests: 499 MiB; 336 one at a time).
    At most two at once (one read while one is published), one per token: a token's second request
    waits for its first, and another token's request goes ahead of it (one at a time for all, a
    request stuck in publishing held every other token's request behind it).

    Decided by order, not time: a request whose body has been received goes on, in that step of the event loop,
    until it waits its turn or hands its body to a thread to be read (noted here, synchronously); once the loop
    has taken another turn after the bodies arrived, whatever has not been handed over is waiting its turn."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from synthwatch.producers import gateway as gateway_module
    from synthwatch.producers.gateway import PARSING_AT_ONCE, GatewayPublisher, create_app

    read_started: list[str] = []
    to_thread = gateway_module.run_in_threadpool

    async def noting_reads(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is gateway_module.read_body:
            read_started.append(json.loads(bytes(args[0]))["event_id"])
        return await to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(gateway_module, "run_in_threadpool", noting_reads)
    received = [0]

    assert PARSING_AT_ONCE == 2
    settings = isolated_settings(broker, tmp_path / "data")
    store = TokenStore.open(tmp_path / "tokens.json")
    secrets = {name: store.create("lab-fr", ["LAB-FR-01"], [])[1] for name in "ABC"}
    publisher = GatewayPublisher(settings, broker.bootstrap_servers, None)
    held = {"A1": threading.Event(), "B1": threading.Event()}
    entered: list[str] = []

    def publish(token: Any, records: Any) -> Any:
        event_id = json.loads(records[0].raw)["event_id"]
        entered.append(event_id)
        if event_id in held:
            assert held[event_id].wait(60)
        return publisher.publish_request(token, records)

    def post(client: Any, name: str) -> int:
        headers = {"Authorization": f"Bearer {secrets[name[0]]}", "Content-Type": "application/x-ndjson"}
        return client.post("/v1/reports", content=json.dumps(lab(event_id=name)), headers=headers).status_code

    try:
        app = bodies_counted(create_app(settings, store, publish), received)
        with TestClient(app, base_url="http://localhost") as client, ThreadPoolExecutor(4) as pool:
            a1 = pool.submit(post, client, "A1")
            wait_until(lambda: entered == ["A1"], 30, "A1 to be published", details=lambda: f"{entered} {a1}")
            a2 = pool.submit(post, client, "A2")  # the same token: waits for A1
            b1 = pool.submit(post, client, "B1")
            wait_until(lambda: "B1" in entered, 30, "B1 to go ahead of token A's queue")
            c1 = pool.submit(post, client, "C1")
            wait_until(lambda: received[0] == 4, 30, "A2's and C1's bodies to be received")
            assert client.portal is not None
            client.portal.call(asyncio.sleep, 0)  # a turn of the loop after their steps: both are parked
            # two are in: neither A2 (A1's token) nor C1 (a third) was handed to be read
            assert read_started == ["A1", "B1"] and entered == ["A1", "B1"] and not a2.done()
            held["B1"].set()
            assert (b1.result(timeout=30), c1.result(timeout=30)) == (200, 200)  # C1 took B1's place
            assert entered == ["A1", "B1", "C1"] and not a2.done()
            held["A1"].set()
            assert (a1.result(timeout=30), a2.result(timeout=30)) == (200, 200)
            assert entered == ["A1", "B1", "C1", "A2"]
    finally:
        for event in held.values():
            event.set()
        publisher.close()


@pytest.mark.integration
def test_a_charset_that_is_no_character_set_is_refused_before_the_body_is_decoded(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """``charset=punycode`` was decoded, on the event loop, in quadratic time (1.28 M bytes: 14.5 CPU s; an
    8 MiB body ~10 min during which no other organisation's request was even authenticated); ``idna`` and
    ``undefined`` raised on decoding (500), ``zlib`` too. Real character sets are still honoured."""
    with in_process(broker, tmp_path, gateway_rate_burst=20) as gateway:
        for charset in ("punycode", "PUNYCODE", "idna", "undefined", "unicode_escape", "zlib", "base64", "nope"):
            response = gateway.post(b"-" + b"a" * 1000, f"application/x-ndjson; charset={charset}")
            assert response.status_code == 415, (charset, response.status_code, response.text[:200])
        for charset, event_id in [("utf-16", "cs-utf16"), ("cp1252", "cs-cp1252"), ("UTF_8", "cs-utf8")]:
            body = json.dumps(lab(event_id=event_id), ensure_ascii=False).encode(charset.replace("UTF_8", "utf-8"))
            response = gateway.post(body, f"application/x-ndjson; charset={charset}")
            assert response.status_code == 200 and response.json()["accepted"] == 1, (charset, response.text)
        assert gateway.topic_size(gateway.settings.topic_lab_detections) == 3


def test_records_read_and_refused_are_charged_to_the_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=10, clock=lambda: now[0])  # one unit a second
    limiter.charge("a", 4)
    assert limiter.wait("a", 6) == 0 and limiter.wait("a", 7) == pytest.approx(1.0)
    limiter.charge("a", 100)  # floor 0: the bucket is emptied, never below
    assert limiter.wait("a", 1) == pytest.approx(1.0)
    now[0] += 3
    limiter.charge("a", 100, floor=-limiter.burst)  # a debt, at most one burst deep
    assert limiter.wait("a", 1) == pytest.approx(11.0)


@pytest.mark.integration
def test_a_body_refused_after_it_was_read_is_charged_its_records(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A body over the record cap (413) or over the token's bucket (429 after reading) was read, up to the cap's
    records (~0.2-1.2 CPU s and one of the two turns), and charged nothing: with its bucket never used, a token
    had the gateway read such a body at its request rate (a second) for ever, ahead of other organisations."""
    overrides = {
        "gateway_max_records": 50,
        "gateway_rate_records_per_minute": 1.0,
        "gateway_rate_records_burst": 50,
        "gateway_rate_burst": 20,
    }
    with in_process(broker, tmp_path / "cap", **overrides) as gateway:
        over_cap = b"1\n" * 51
        assert gateway.post(over_cap).status_code == 413
        again = gateway.post(over_cap)  # the 51 records read are charged: the bucket is in debt, not read again
        assert again.status_code == 429 and "nothing was read" in again.json()["detail"], again.text

    with in_process(broker, tmp_path / "rate", **overrides) as gateway:
        assert gateway.post("\n".join(json.dumps(lab(event_id=f"paid-{n}")) for n in range(30))).status_code == 200
        full = "\n".join(json.dumps(lab(event_id=f"unpaid-{n}")) for n in range(50))
        refused = gateway.post(full)  # 20 records left for 50: read, then refused; the read empties the bucket
        assert refused.status_code == 429 and "nothing was published" in refused.json()["detail"], refused.text
        assert 2990 <= int(refused.headers["Retry-After"]) <= 3000  # the time for all 50 records (1 a minute)
        for body in (full, json.dumps(lab(event_id="small"))):  # not read again before the 50 can be published
            unread = gateway.post(body)
            assert unread.status_code == 429 and "nothing was read" in unread.json()["detail"], unread.text
            assert "the 50 records it last sent" in unread.json()["detail"]
        assert gateway.topic_size(gateway.settings.topic_lab_detections) == 30


@pytest.mark.integration
def test_a_tokens_requests_waiting_in_line_are_not_read_once_the_first_used_its_bucket(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests a token sends at once all pass the bucket check before the first is read; they wait in line
    behind it, and were each read in turn (10 at the request burst) though the first had used the bucket. The
    bucket is checked again at a request's turn: those behind get 429 unread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from synthwatch.producers import gateway as gateway_module

    release = threading.Event()
    reads: list[int] = []
    read_body = gateway_module.read_body

    def held_read(body: bytearray, *args: Any) -> Any:
        reads.append(len(body))
        assert release.wait(60)
        return read_body(body, *args)

    monkeypatch.setattr(gateway_module, "read_body", held_read)
    received = [0]

    overrides = {"gateway_max_records": 50, "gateway_rate_records_per_minute": 1.0, "gateway_rate_records_burst": 50}
    settings = isolated_settings(broker, tmp_path / "data", **overrides)
    store = TokenStore.open(tmp_path / "tokens.json")
    _, secret = store.create("lab-fr", ["LAB-FR-01"], [])
    publisher = gateway_module.GatewayPublisher(settings, broker.bootstrap_servers, None)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/x-ndjson"}
    try:
        app = bodies_counted(gateway_module.create_app(settings, store, publisher.publish_request), received)
        with TestClient(app, base_url="http://localhost") as client, ThreadPoolExecutor(3) as pool:

            def post() -> httpx.Response:
                return client.post("/v1/reports", content=b"1\n" * 51, headers=headers)

            first = pool.submit(post)
            wait_until(lambda: len(reads) == 1, 30, "the first body to be read")
            behind = [pool.submit(post) for _ in range(2)]
            wait_until(lambda: received[0] == 3, 30, "the bodies behind it to be received (checked, in line)")
            release.set()
            assert first.result(timeout=30).status_code == 413
            for response in (future.result(timeout=30) for future in behind):
                assert response.status_code == 429 and "nothing was read" in response.json()["detail"], response.text
            assert len(reads) == 1
    finally:
        release.set()
        publisher.close()


def test_a_csv_body_is_held_as_its_rows_text_until_they_are_judged() -> None:
    """Rows were held as objects until published: 4,191 rows of 1,000 filled cells (8 MiB) were 156 MiB, two
    requests read at once twice that. They are their JSON text now, the object built again when judged."""
    import tracemalloc

    header = ",".join(f"c{n}" for n in range(250)) + "\n"
    body = header + (",".join(["1"] * 250) + "\n") * 4_000  # 2 MiB, a million filled cells
    tracemalloc.start()
    try:
        records = records_of(body, "csv", "req", Settings())
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 20 * 2**20, f"{held / 2**20:.0f} MiB"  # the text, ~13 MiB
    from synthwatch.producers.gateway import CsvRow

    assert len(records) == 4_000 and isinstance(records[0], CsvRow) and records[0].obj is None
    assert records[0].object_of().obj == {f"c{n}": "1" for n in range(250)}


@pytest.mark.integration
def test_a_token_has_at_most_eight_requests_in_flight_and_others_still_get_in(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The server takes 64 connections at once; a token whose requests waited in line (or whose bodies came
    slowly) could hold them all within its request rate, and every other organisation got 503. A token's
    requests beyond IN_FLIGHT_PER_TOKEN get 429 at once; another token's request is served meanwhile."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from synthwatch.producers.gateway import IN_FLIGHT_PER_TOKEN, GatewayPublisher, create_app

    assert IN_FLIGHT_PER_TOKEN == 8
    settings = isolated_settings(broker, tmp_path / "data", gateway_rate_burst=20)
    store = TokenStore.open(tmp_path / "tokens.json")
    secrets = {name: store.create("lab-fr", ["LAB-FR-01"], [])[1] for name in "AB"}
    publisher = GatewayPublisher(settings, broker.bootstrap_servers, None)
    release = threading.Event()
    received = [0]

    def publish(token: Any, records: Any) -> Any:
        if json.loads(records[0].raw)["event_id"] == "A0":
            assert release.wait(60)
        return publisher.publish_request(token, records)

    try:
        app = bodies_counted(create_app(settings, store, publish), received)
        with TestClient(app, base_url="http://localhost") as client, ThreadPoolExecutor(10) as pool:

            def post(name: str) -> httpx.Response:
                headers = {"Authorization": f"Bearer {secrets[name[0]]}", "Content-Type": "application/x-ndjson"}
                return client.post("/v1/reports", content=json.dumps(lab(event_id=name)), headers=headers)

            in_line = []
            for n in range(IN_FLIGHT_PER_TOKEN):  # A0 held in publishing, A1-A7 in line behind it
                in_line.append(pool.submit(post, f"A{n}"))
                wait_until(lambda n=n: received[0] == n + 1, 30, f"A{n}'s body to be received")
            refused = post("A8")
            assert refused.status_code == 429 and "at most 8 in flight" in refused.json()["detail"], refused.text
            assert post("B0").status_code == 200  # another organisation is served meanwhile
            release.set()
            assert [future.result(timeout=60).status_code for future in in_line] == [200] * IN_FLIGHT_PER_TOKEN
            assert post("A9").status_code == 200  # answered ones leave the count
    finally:
        release.set()
        publisher.close()


def test_white_space_of_a_json_body_is_skipped_at_the_regex_engines_speed() -> None:
    """8 MiB of spaces around or in an array took 0.51 CPU s to skip one character at a time in Python, and
    no record was read, so none was charged to the token."""
    import time

    spaces = " " * (8 * 2**20)
    for body, count in [(f"[{spaces}]", 0), (f"{spaces}{{}}", 1), (f"[1,{spaces}2]", 2)]:
        started = time.thread_time()
        records = records_of(body, "json", "req", Settings())
        spent = time.thread_time() - started
        assert spent < 0.2 and len(records) == count, (spent, len(records))
