"""One place that turns ``SYNTHWATCH_KAFKA_*`` settings into each Kafka client's security arguments.

Every client synthwatch creates (the kafka-python publisher and admin client, the aiokafka clients of
the benchmarks, the Faust worker) takes its TLS and SASL configuration from here, so a deployment
switches all of them to SASL_SSL (SCRAM-SHA-512) or mTLS with the same few variables. Passwords are
read from a ``SecretStr`` only when a client is built; nothing here logs or formats them.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

from synthwatch.errors import SynthwatchError
from synthwatch.settings import Settings


class KafkaSecurityError(SynthwatchError, ValueError):
    """The Kafka security settings cannot be used (a missing file, an incomplete credential)."""


class KafkaConnectError(SynthwatchError, RuntimeError):
    """A client could not talk to Kafka with the configured security (the message says what to check)."""

    @classmethod
    def of(cls, settings: Settings, servers: str, error: BaseException) -> KafkaConnectError:
        """The error with what to check for this protocol; the password is never part of it."""
        hints = []
        if _uses_tls(settings):
            hints.append(
                "does the broker listen with TLS on that port, and does SYNTHWATCH_KAFKA_SSL_CAFILE hold the CA that "
                "signed its certificate?"
            )
        if _uses_sasl(settings):
            hints.append(
                f"is {settings.kafka_sasl_username!r} a {settings.kafka_sasl_mechanism} user on the broker, "
                "with this SYNTHWATCH_KAFKA_SASL_PASSWORD?"
            )
        if not hints:
            hints.append(
                "is the broker running? One that requires TLS or SASL fails the same way: set "
                "SYNTHWATCH_KAFKA_SECURITY_PROTOCOL and its credentials (docs/security.md#kafka-authentication)"
            )
        return cls(
            f"cannot talk to Kafka at {servers} ({describe(settings)}): {type(error).__name__}: {error}. "
            + " ".join(hints)
        )


def _existing(path: Path | None, variable: str) -> str | None:
    """``path`` as a string, after checking it is a readable file (a clear error beats a TLS alert)."""
    if path is None:
        return None
    if not path.is_file():
        raise KafkaSecurityError(
            f"{variable}={path} is not a file: point it at the PEM file (docs/security.md#kafka-authentication)"
        )
    return str(path)


def _uses_tls(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def _uses_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol.startswith("SASL_")


def _password(settings: Settings) -> str:
    secret = settings.kafka_sasl_password
    if secret is None or not settings.kafka_sasl_username:  # the settings validator already refuses this
        raise KafkaSecurityError("SASL needs SYNTHWATCH_KAFKA_SASL_USERNAME and SYNTHWATCH_KAFKA_SASL_PASSWORD")
    return secret.get_secret_value()


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for aiokafka/Faust (CA, optional client certificate for mTLS), or None without TLS."""
    if not _uses_tls(settings):
        return None
    cafile = _existing(settings.kafka_ssl_cafile, "SYNTHWATCH_KAFKA_SSL_CAFILE")
    certfile = _existing(settings.kafka_ssl_certfile, "SYNTHWATCH_KAFKA_SSL_CERTFILE")
    keyfile = _existing(settings.kafka_ssl_keyfile, "SYNTHWATCH_KAFKA_SSL_KEYFILE")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = settings.kafka_ssl_check_hostname
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


def tls_preflight(settings: Settings, servers: str, timeout: float = 10.0, grace: float = 1.0) -> None:
    """Check that the first reachable bootstrap server completes a TLS handshake, or raise KafkaConnectError.

    Why: kafka-python waits forever for the answer to its TLS hello from a listener that does not speak
    TLS (a plaintext listener reads the hello as the length of a huge request and waits for the rest), so
    the publisher hung instead of failing. One handshake with a deadline first turns that into an error.
    A handshake still unanswered after ``grace`` seconds is the mark of such a listener, but also of a slow
    one: a second connection then asks in plaintext for the broker's API versions. A Kafka answer proves a
    plaintext listener and fails at once (the user does not wait out ``timeout``); anything else (a TLS alert,
    a close, silence) proves nothing and the handshake keeps its full deadline.
    """
    context = ssl_context(settings)
    if context is None:
        return
    problems = []
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        try:
            problem = _tls_handshake(context, host, int(port), timeout, grace)
        except ssl.SSLError as error:
            problem = f"TLS handshake failed ({error.reason or error})"
        except (OSError, ValueError) as error:
            problem = str(error)
        if problem is None:
            return
        problems.append(f"{server}: {problem}")
    raise KafkaConnectError.of(settings, servers, ConnectionError("; ".join(problems)))


def _tls_handshake(context: ssl.SSLContext, host: str, port: int, timeout: float, grace: float) -> str | None:
    """None once the handshake with ``host:port`` completes, else why it did not (see ``tls_preflight``)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.settimeout(min(grace, timeout))
        with context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False) as tls:
            try:
                tls.do_handshake()  # resumable: a timeout leaves OpenSSL waiting for the server's answer
                return None
            except TimeoutError:
                pass
            answered = _handshake_or_kafka_answer(tls, host, port, deadline)
            if answered == "tls":
                return None
            if answered == "kafka":
                return "it answers Kafka in plaintext, not TLS: a PLAINTEXT listener"
            return f"no TLS answer within {timeout:.0f} s (is it a PLAINTEXT listener?)"


# ApiVersions v0 (api key 18): the request every Kafka listener answers before any authentication.
_PROBE_CORRELATION_ID = 0x53570001
_PROBE_CLIENT_ID = b"synthwatch-tls-preflight"
_PROBE_HEADER = struct.pack(">hhih", 18, 0, _PROBE_CORRELATION_ID, len(_PROBE_CLIENT_ID)) + _PROBE_CLIENT_ID
_PROBE_REQUEST = struct.pack(">i", len(_PROBE_HEADER)) + _PROBE_HEADER


def _handshake_or_kafka_answer(tls: ssl.SSLSocket, host: str, port: int, deadline: float) -> str | None:
    """Until ``deadline``, whichever comes first: "tls" when the TLS handshake completes, "kafka" when a
    second, plaintext connection gets a Kafka answer to ApiVersions; None at the deadline.

    Both are watched at once, so neither waits for the other: a slow TLS broker still completes its
    handshake while the probe waits, and a plaintext broker slow to answer is still recognised however
    late, within the deadline. A TLS listener reads the probe as a malformed record and answers with an
    alert or closes; only a plaintext Kafka listener echoes our correlation id in a frame of plausible size.
    A TLS error of the handshake (a certificate refused) is raised.
    """
    probe: socket.socket | None = None
    with contextlib.suppress(OSError):  # no probe: the handshake alone decides, until the deadline
        probe = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.001))
        probe.sendall(_PROBE_REQUEST)
    answer = b""
    tls.setblocking(False)
    with selectors.DefaultSelector() as watching:
        watching.register(tls, selectors.EVENT_READ, "tls")
        if probe is not None:
            watching.register(probe, selectors.EVENT_READ, "probe")
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                for key, _ in watching.select(remaining):
                    if key.data == "tls":
                        try:
                            tls.do_handshake()
                            return "tls"
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            continue
                    assert probe is not None
                    try:
                        chunk = probe.recv(8 - len(answer))
                    except OSError:
                        chunk = b""
                    answer += chunk
                    if chunk and len(answer) < 8:
                        continue
                    if len(answer) == 8:
                        size, correlation_id = struct.unpack(">ii", answer)
                        if correlation_id == _PROBE_CORRELATION_ID and 4 <= size <= 1 << 20:
                            return "kafka"
                    watching.unregister(probe)  # closed, or not Kafka: the probe proved nothing
                    probe.close()
                    probe = None
        finally:
            if probe is not None:
                probe.close()
    return None


def kafka_python_config(settings: Settings) -> dict[str, Any]:
    """Security keyword arguments for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
    config: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if _uses_tls(settings):
        config |= {
            "ssl_cafile": _existing(settings.kafka_ssl_cafile, "SYNTHWATCH_KAFKA_SSL_CAFILE"),
            "ssl_certfile": _existing(settings.kafka_ssl_certfile, "SYNTHWATCH_KAFKA_SSL_CERTFILE"),
            "ssl_keyfile": _existing(settings.kafka_ssl_keyfile, "SYNTHWATCH_KAFKA_SSL_KEYFILE"),
            "ssl_check_hostname": settings.kafka_ssl_check_hostname,
        }
    if _uses_sasl(settings):
        config |= _sasl(settings)
    return config


def _sasl(settings: Settings) -> dict[str, Any]:
    """The SASL keyword arguments kafka-python and aiokafka share (same names in both)."""
    return {
        "sasl_mechanism": settings.kafka_sasl_mechanism,
        "sasl_plain_username": settings.kafka_sasl_username,
        "sasl_plain_password": _password(settings),
    }


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """Security keyword arguments for aiokafka's AIOKafkaProducer and AIOKafkaConsumer."""
    config: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    context = ssl_context(settings)
    if context is not None:
        config["ssl_context"] = context
    if _uses_sasl(settings):
        config |= _sasl(settings)
    return config


def faust_credentials(settings: Settings) -> Any:
    """``broker_credentials`` for ``faust.App``: SASLCredentials (with TLS for SASL_SSL), SSLCredentials, or None.

    Faust hands them to every aiokafka client it makes (consumer, producer, the admin client that creates
    changelog topics) through ``credentials_to_aiokafka_auth``.
    """
    import faust

    context = ssl_context(settings)
    if _uses_sasl(settings):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=_password(settings),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def describe(settings: Settings) -> str:
    """One line for logs and ``status``: protocol, mechanism, principal and files; never the password."""
    parts: list[str] = [settings.kafka_security_protocol]
    if _uses_sasl(settings):
        parts.append(f"{settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username!r}")
    if _uses_tls(settings):
        parts.append("client certificate" if settings.kafka_ssl_certfile else "server certificate only")
    return ", ".join(parts)
