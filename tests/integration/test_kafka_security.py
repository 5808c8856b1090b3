"""Kafka client security (issue 12, item 2) and the vendored broker's checksum.

The embedded Tansu 0.6 cannot run with TLS or with users (docs/security.md#kafka-authentication says why), so the
client side is tested this way instead:
- each client factory (kafka-python publisher and admin, aiokafka, Faust) gets the SASL/TLS settings
  from the one builder, with the password only where a client needs it;
- against a real Tansu started with ``--authentication``, a SCRAM-SHA-512 client really runs the SCRAM
  exchange (and is refused: that broker has no users), and a plaintext client gets nothing;
- a client configured for SASL_SSL refuses to talk to the plaintext broker, with an error saying what
  to check.
The signed envelope is tested end to end: a real worker with an organisation keys file stores what a
signing publisher sends and rejects a forger's records (stage ``auth``) with their reasons.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kafka import KafkaAdminClient, KafkaProducer
from pydantic import ValidationError

from synthwatch.kafka_clients import (
    KafkaConnectError,
    KafkaSecurityError,
    aiokafka_config,
    describe,
    faust_credentials,
    kafka_python_config,
    tls_preflight,
)
from synthwatch.producers.publisher import Publisher, SigningError, signing_key
from synthwatch.producers.readers import InputRecord
from synthwatch.schemas.envelope import envelope_headers
from synthwatch.settings import Settings
from synthwatch.stack.broker import TANSU_SHA256, BrokerError, EmbeddedBroker, ensure_topics, file_sha256, tansu_binary
from tests.conftest import isolated_settings, start_worker, stop_worker, wait_until
from tests.support.factories import lab

PASSWORD = "s3cr3t-Pa55word-never-printed"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throw-away CA and a client certificate it signed, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "client.key", "client.csr", "client.pem"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA", "-keyout",
            str(ca_key), "-out", str(ca))  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=lab-fr", "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
            "-out", str(cert))  # fmt: skip
    return {"ca": ca, "cert": cert, "key": key}


def scram(**changes: Any) -> Settings:
    return Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="lab-fr",
        kafka_sasl_password=PASSWORD,
        **changes,
    )


# --- one builder, every client ---------------------------------------------------------------------------


def test_plaintext_is_the_default_and_adds_nothing() -> None:
    settings = Settings()
    assert kafka_python_config(settings) == {"security_protocol": "PLAINTEXT"}
    assert aiokafka_config(settings) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(settings) is None


def test_sasl_ssl_scram_for_kafka_python_aiokafka_and_faust(pki: dict[str, Path]) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    settings = scram(kafka_ssl_cafile=pki["ca"])
    assert kafka_python_config(settings) == {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(pki["ca"]),
        "ssl_certfile": None,
        "ssl_keyfile": None,
        "ssl_check_hostname": True,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "lab-fr",
        "sasl_plain_password": PASSWORD,
    }
    aio = aiokafka_config(settings)
    assert aio["security_protocol"] == "SASL_SSL" and aio["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(aio["ssl_context"], ssl.SSLContext) and aio["ssl_context"].check_hostname
    assert aio["ssl_context"].minimum_version >= ssl.TLSVersion.TLSv1_2
    # what Faust hands to each aiokafka client it makes (consumer, producer, admin)
    faust_auth = credentials_to_aiokafka_auth(faust_credentials(settings))
    assert {k: v for k, v in faust_auth.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "lab-fr",
        "sasl_plain_password": PASSWORD,
    }
    assert isinstance(faust_auth["ssl_context"], ssl.SSLContext)


def test_mtls_loads_the_client_certificate(pki: dict[str, Path]) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    settings = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki["ca"],
        kafka_ssl_certfile=pki["cert"],
        kafka_ssl_keyfile=pki["key"],
    )
    config = kafka_python_config(settings)
    assert config["ssl_certfile"] == str(pki["cert"]) and config["ssl_keyfile"] == str(pki["key"])
    assert "sasl_mechanism" not in config
    faust_auth = credentials_to_aiokafka_auth(faust_credentials(settings))
    assert faust_auth["security_protocol"] == "SSL" and isinstance(faust_auth["ssl_context"], ssl.SSLContext)
    with pytest.raises(ValidationError, match="both SYNTHWATCH_KAFKA_SSL_CERTFILE and"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_certfile=pki["cert"])
    with pytest.raises(KafkaSecurityError, match=r"SYNTHWATCH_KAFKA_SSL_CAFILE=.* is not a file"):
        kafka_python_config(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=pki["ca"].with_name("none")))


def test_the_worker_app_gets_the_credentials() -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from synthwatch.stream_apps.app import WorkerContext, create_app
    from synthwatch.stream_apps.detect.intake import Intake
    from synthwatch.stream_apps.detect.novelty import NoveltyDetector
    from synthwatch.stream_apps.detect.region import DetectionConfig, RegionDetector

    settings = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="worker", kafka_sasl_password="p")
    sink = SimpleNamespace(lock=threading.Lock(), store_rejects=None, store_alerts=None)
    ctx = WorkerContext(
        settings=settings,
        client=None,  # type: ignore[arg-type]  # not used while the app is only built
        sink=sink,  # type: ignore[arg-type]
        intake=Intake(),
        regions=RegionDetector(DetectionConfig.from_settings(settings)),
        novelty=NoveltyDetector(DetectionConfig.from_settings(settings).novelty),
        started_at=time.monotonic(),
    )
    app = create_app(ctx, "127.0.0.1:9", 6066)
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512" and auth["sasl_plain_username"] == "worker"


def test_the_password_is_never_printed() -> None:
    settings = scram(kafka_ssl_check_hostname=False)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())
    assert PASSWORD not in describe(settings) and "'lab-fr'" in describe(settings)
    error = KafkaConnectError.of(settings, "broker:9093", TimeoutError("no answer"))
    assert PASSWORD not in str(error) and "SYNTHWATCH_KAFKA_SSL_CAFILE" in str(error)
    with pytest.raises(ValidationError, match="needs SYNTHWATCH_KAFKA_SASL_USERNAME"):
        Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="lab-fr")


# --- against a real broker ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_sasl_ssl_clients_refuse_a_plaintext_broker_with_a_clear_error(
    broker: EmbeddedBroker, pki: dict[str, Path]
) -> None:
    """Without the TLS pre-flight kafka-python waited forever (Tansu reads the TLS hello as a request length);
    the pre-flight's plaintext probe names the cause at once instead of after its 10 s deadline."""
    settings = scram(kafka_ssl_cafile=pki["ca"])
    for make in (
        lambda: Publisher(settings, broker.bootstrap_servers),
        lambda: ensure_topics(settings, broker.bootstrap_servers),
    ):
        with pytest.raises(KafkaConnectError) as caught:
            make()
        message = str(caught.value)
        assert f"cannot talk to Kafka at {broker.bootstrap_servers} (SASL_SSL, SCRAM-SHA-512 as 'lab-fr'" in message
        assert "it answers Kafka in plaintext, not TLS: a PLAINTEXT listener" in message
        assert "does the broker listen with TLS" in message and PASSWORD not in message


def test_a_listener_silent_in_tls_and_in_plaintext_still_gets_the_whole_tls_deadline(pki: dict[str, Path]) -> None:
    """The plaintext probe proves only a Kafka answer: a listener that says nothing (a slow TLS broker, a
    black hole) is not called plaintext, and the handshake keeps waiting until its own deadline."""
    import socket

    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(5)
        port = silent.getsockname()[1]
        accepting = threading.Thread(target=lambda: held.extend(silent.accept()[0] for _ in range(2)), daemon=True)
        accepting.start()
        try:
            with pytest.raises(KafkaConnectError, match=r"no TLS answer within 3 s \(is it a PLAINTEXT listener\?\)"):
                tls_preflight(scram(kafka_ssl_cafile=pki["ca"]), f"127.0.0.1:{port}", timeout=3.0, grace=0.2)
            accepting.join(5)
            assert len(held) == 2  # the handshake and the probe: silence to the probe proved nothing
        finally:
            for connection in held:
                connection.close()


def _serve(handle: Any) -> tuple[int, socket.socket]:
    """A loopback listener handing each connection, in order, to ``handle(n, connection)`` in a thread."""
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        for n in itertools.count():
            try:
                connection, _ = server.accept()
            except OSError:  # closed by the test
                return
            threading.Thread(target=handle, args=(n, connection), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], server


def test_a_plaintext_kafka_listener_slow_to_answer_is_still_named_before_the_deadline(pki: dict[str, Path]) -> None:
    """A loaded plaintext broker answers the probe late, after the grace: it is still called plaintext, as
    soon as it answers, not after the whole deadline (the probe waited only the grace before; under load the
    SASL_SSL test then got the generic timeout)."""
    from synthwatch.kafka_clients import _tls_handshake

    def handle(n: int, connection: socket.socket) -> None:
        data = connection.recv(200)
        if data[:4] == struct.pack(">i", len(data) - 4):  # a Kafka request: the probe; the TLS hello is not one
            time.sleep(0.6)
            correlation_id = struct.unpack(">i", data[8:12])[0]
            connection.sendall(struct.pack(">ii", 8, correlation_id) + b"\0\0\0\0")
        time.sleep(3)

    port, server = _serve(handle)
    with server:
        started = time.monotonic()
        problem = _tls_handshake(ssl.create_default_context(cafile=pki["ca"]), "127.0.0.1", port, 5.0, 0.2)
        took = time.monotonic() - started
    assert problem == "it answers Kafka in plaintext, not TLS: a PLAINTEXT listener"
    assert took < 5.0, "named at the answer, not at the deadline"


def test_a_tls_listener_slow_to_handshake_completes_while_the_probe_waits(pki: dict[str, Path]) -> None:
    """The probe and the handshake are watched together: a TLS broker that answers the hello late and never
    answers the probe still completes the handshake before the deadline."""
    from synthwatch.kafka_clients import _tls_handshake

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki["cert"], pki["key"])

    def handle(n: int, connection: socket.socket) -> None:
        if n == 0:  # the handshake's connection: a slow TLS broker
            time.sleep(0.6)
            with server_context.wrap_socket(connection, server_side=True):
                time.sleep(3)
        else:  # the probe: silence
            time.sleep(3)

    client_context = ssl.create_default_context(cafile=pki["ca"])
    client_context.check_hostname = False  # the test certificate names "lab-fr", not 127.0.0.1
    port, server = _serve(handle)
    with server:
        assert _tls_handshake(client_context, "127.0.0.1", port, 5.0, 0.2) is None


@pytest.mark.integration
def test_scram_clients_run_the_exchange_against_tansu_with_authentication(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tansu's ``--authentication`` with memory storage has no users: everyone is refused, which shows both
    that the broker enforces SASL and that our clients really speak SCRAM-SHA-512 to it."""
    from aiokafka import AIOKafkaProducer

    settings = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="worker", kafka_sasl_password="x")
    with EmbeddedBroker(Settings(), log_path=tmp_path / "tansu.log", authentication=True) as secured:
        with pytest.raises(Exception, match="Unable to bootstrap"):  # plaintext: nothing but ApiVersions answers
            KafkaAdminClient(bootstrap_servers=secured.bootstrap_servers, bootstrap_timeout_ms=2000)
        with caplog.at_level(logging.DEBUG, logger="kafka"), pytest.raises(Exception, match="Unable to bootstrap"):
            KafkaAdminClient(
                bootstrap_servers=secured.bootstrap_servers, bootstrap_timeout_ms=2000, **kafka_python_config(settings)
            )
        exchange = caplog.text
        assert "SaslHandshakeRequest(version=1, mechanism='SCRAM-SHA-512')" in exchange
        assert "n=worker" in exchange and "e=unknown-user" in exchange  # the broker's SCRAM answer
        assert "x" * 3 not in exchange

        async def aiokafka_start() -> None:
            producer = AIOKafkaProducer(
                bootstrap_servers=secured.bootstrap_servers, request_timeout_ms=3000, **aiokafka_config(settings)
            )
            try:
                await producer.start()
            finally:
                await producer.stop()

        with pytest.raises(Exception):  # noqa: B017 - aiokafka fails on Tansu's `e=` answer with a KeyError
            asyncio.run(aiokafka_start())
    assert "NotAuthenticated" in (tmp_path / "tansu.log").read_text()


# --- the vendored broker ------------------------------------------------------------------------------------


def test_the_vendored_tansu_matches_its_pinned_digest() -> None:
    path = tansu_binary(Settings())
    assert file_sha256(path) in TANSU_SHA256.values()


def test_a_tansu_binary_with_another_digest_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_bytes(b"#!/bin/sh\necho pretending to be a broker\n")
    fake.chmod(0o700)
    with pytest.raises(BrokerError, match=r"has SHA-256 [0-9a-f]{64}, expected .*not the vendored broker"):
        tansu_binary(Settings(tansu_bin=str(fake)))
    with pytest.raises(BrokerError, match="not the vendored broker"):
        EmbeddedBroker(Settings(tansu_bin=str(fake))).start()
    # an operator's own build passes with its own digest
    assert tansu_binary(Settings(tansu_bin=str(fake), tansu_sha256=file_sha256(str(fake)))) == str(fake)


# --- signed reports end to end ---------------------------------------------------------------------------------


def test_publisher_signing_key_comes_from_the_settings_or_the_keys_file(tmp_path: Path) -> None:
    key = bytes(range(32))
    keys = tmp_path / "orgs.yaml"
    keys.write_text(yaml.safe_dump({"organisations": {"lab-fr": {"keys": [key.hex()], "lab_ids": ["LAB-FR-01"]}}}))
    keys.chmod(0o600)
    assert signing_key(Settings()) is None
    assert signing_key(Settings(org_id="lab-fr", org_key=key.hex())) == ("lab-fr", key, None)  # bindings unknown
    from_file = signing_key(Settings(org_id="lab-fr", org_keys_file=keys))
    assert from_file is not None and from_file[:2] == ("lab-fr", key)
    assert from_file.organisation is not None and from_file.organisation.lab_ids == {"LAB-FR-01"}
    with pytest.raises(SigningError, match="'lab-de' is not in"):
        signing_key(Settings(org_id="lab-de", org_keys_file=keys))
    with pytest.raises(SigningError, match="needs SYNTHWATCH_ORG_KEY"):
        signing_key(Settings(org_id="lab-de"))


@pytest.mark.integration
def test_worker_stores_signed_reports_and_rejects_forgeries(broker: EmbeddedBroker, tmp_path: Path) -> None:
    key_fr, key_de = bytes(range(32)), bytes(range(100, 132))
    keys = tmp_path / "orgs.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "organisations": {
                    "lab-fr": {"keys": [key_fr.hex()], "lab_ids": ["LAB-FR-01"]},
                    "lab-de": {"keys": [key_de.hex()], "lab_ids": ["LAB-DE-07"]},
                }
            }
        )
    )
    keys.chmod(0o600)
    settings = isolated_settings(broker, tmp_path / "data", org_keys_file=keys)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        publisher_settings = settings.model_copy(update={"org_id": "lab-fr", "org_key": None})
        records = [lab(event_id="sig-ok-1"), lab(event_id="sig-ok-2", lab_id="LAB-FR-01")]
        with Publisher(publisher_settings, broker.bootstrap_servers) as publisher:
            summary = publisher.publish_records(InputRecord(f"f:{i}", json.dumps(r)) for i, r in enumerate(records))
        assert summary.sent == 2 and summary.balanced

        topic = settings.topic_lab_detections
        forger = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        # lab-fr reporting as lab-de, signed with lab-fr's own key (synthwatch publish refuses it before sending:
        # test_publisher_refuses_what_the_signing_organisation_may_not_report_with_the_workers_reason)
        as_de = json.dumps(lab(event_id="sig-forged-lab", lab_id="LAB-DE-07")).encode()
        forger.send(
            topic, key=b"FR-75C", value=as_de, headers=envelope_headers("lab-fr", key_fr, topic, b"FR-75C", as_de)
        )
        unsigned = json.dumps(lab(event_id="sig-unsigned")).encode()
        forger.send(topic, key=b"FR-75C", value=unsigned)
        # lab-de's real key, claiming to be lab-fr
        claimed = json.dumps(lab(event_id="sig-claimed")).encode()
        forger.send(
            topic, key=b"FR-75C", value=claimed, headers=envelope_headers("lab-fr", key_de, topic, b"FR-75C", claimed)
        )
        forger.flush()
        forger.close()

        stored = worker.wait_rows(
            "SELECT event_id FROM lab_detections WHERE event_id LIKE 'sig-%%' ORDER BY event_id",
            {},
            2,
            "signed reports",
        )
        assert [r["event_id"] for r in stored] == ["sig-ok-1", "sig-ok-2"]
        rejects = worker.wait_rows(
            "SELECT event_id, reason FROM rejects WHERE stage = 'auth' ORDER BY reason", {}, 3, "auth rejects"
        )
        reasons = [r["reason"] for r in rejects]
        assert reasons[0].startswith("auth: bad_signature: the signature is not 'lab-fr''s")
        assert reasons[1] == "auth: not_permitted: organisation 'lab-fr' may not report as lab_id 'LAB-DE-07'"
        assert reasons[2].startswith("auth: unsigned")
        stats = wait_until(lambda: (s := worker.stats())["consumed"] == 5 and s, 30, "the worker to count all five")
        assert stats["rejected"] == 3 and stats["consumed"] == 2 + 3
    finally:
        stop_worker(worker)


@pytest.mark.integration
def test_publisher_keeps_refused_records_off_the_rejects_topic_when_told(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Labs may not write the rejects topic (ACLs): their publisher counts refused records instead."""
    from synthwatch.stack.broker import high_watermarks

    settings = isolated_settings(broker, tmp_path, publisher_send_rejects=False)
    records = [InputRecord("f:1", json.dumps(lab(event_id="ok"))), InputRecord("f:2", '{"event_id": "bad", ')]
    with Publisher(settings, broker.bootstrap_servers) as publisher:
        summary = publisher.publish_records(records)
    assert (summary.read, summary.sent, summary.rejected) == (2, 1, 1) and summary.balanced
    assert summary.reject_reasons == {"invalid JSON": 1}
    assert sum(high_watermarks(broker.bootstrap_servers, [settings.topic_rejects]).values()) == 0
    assert sum(high_watermarks(broker.bootstrap_servers, [settings.topic_lab_detections]).values()) == 1


@pytest.mark.integration
def test_publisher_refuses_what_the_signing_organisation_may_not_report_with_the_workers_reason(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """With the keys file, the publisher knows the organisation's lab ids and countries: a record the worker would
    refuse (EnvelopeVerifier.permits) is refused here with the same reason, counted, and never sent."""
    from synthwatch.stack.broker import high_watermarks

    keys = tmp_path / "orgs.yaml"
    orgs = {"lab-fr": {"keys": [bytes(range(32)).hex()], "lab_ids": ["LAB-FR-01"], "countries": ["FR"]}}
    keys.write_text(yaml.safe_dump({"organisations": orgs}))
    keys.chmod(0o600)
    settings = isolated_settings(broker, tmp_path, org_id="lab-fr", org_keys_file=keys, publisher_send_rejects=False)
    france = {"lab_id": "LAB-FR-01", "country": "FR", "region": "FR-75C"}
    records = [
        InputRecord("f:1", json.dumps(lab(event_id="in-fr", **france))),
        InputRecord("f:2", json.dumps(lab(event_id="in-ml", **{**france, "country": "ML", "region": "ML-BKO"}))),
        InputRecord("f:3", json.dumps(lab(event_id="as-de", **{**france, "lab_id": "LAB-DE-07"}))),
    ]
    with Publisher(settings, broker.bootstrap_servers) as publisher:
        summary = publisher.publish_records(records)
    assert (summary.read, summary.sent, summary.rejected) == (3, 1, 2) and summary.balanced
    assert summary.reject_reasons == {"auth": 2}
    assert summary.reject_counts == {
        "auth: not_permitted: organisation 'lab-fr' may not report for country 'ML' (its countries: FR)": 1,
        "auth: not_permitted: organisation 'lab-fr' may not report as lab_id 'LAB-DE-07'": 1,
    }
    assert sum(high_watermarks(broker.bootstrap_servers, [settings.topic_lab_detections]).values()) == 1
