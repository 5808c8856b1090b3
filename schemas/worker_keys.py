"""The worker key: what workers sign the records they write for each other with, and how it is loaded.

Here, beside the organisations' envelopes, rather than in the Faust runtime, because the publisher
signs the rejects it sends with it too (only holders of the worker key may write rejects); the checks
on the worker's side are in ``stream_apps.runtime.worker_signature``.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synthwatch.errors import SynthwatchError
from synthwatch.schemas.envelope import MIN_KEY_BYTES, Headers, OrgKeysError, _header, others_can_reach, parse_key, sign

log = logging.getLogger("synthwatch.worker_signature")

HEADER = "synthwatch-worker-sig"


class WorkerKeyError(SynthwatchError, ValueError):
    """The worker keys cannot be used: the message names the variable or file to fix."""


def _bound(topic: str, partition: int | None) -> str:
    """What a signature binds the record to: its topic, and its partition where the writer chose it."""
    return topic if partition is None else f"{topic}\0{partition}"  # topic names cannot hold NUL


class WorkerSigner:
    """Signs what this worker produces for other workers and checks what it reads from them.

    ``keys``: newest first; the first signs, each is accepted (a rotation in progress).
    """

    def __init__(self, keys: bytes | Sequence[bytes]) -> None:
        keys = (keys,) if isinstance(keys, bytes) else tuple(keys)
        if not keys or any(len(key) < MIN_KEY_BYTES for key in keys):
            raise ValueError(f"worker keys must be at least {MIN_KEY_BYTES} bytes, and there must be one")
        self._keys = keys

    def __repr__(self) -> str:  # never the keys
        return f"WorkerSigner(<{len(self._keys)} key(s)>)"

    def headers(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None = None
    ) -> list[tuple[str, bytes]]:
        """The header that proves a worker produced this record (on this partition, when given)."""
        return [(HEADER, sign(self._keys[0], _bound(topic, partition), key, value))]

    def valid(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None, partition: int | None = None
    ) -> bool:
        """Whether ``headers`` carry this deployment's worker signature over the record."""
        signature = _header(headers, HEADER)
        if signature is None or value is None:
            return False
        bound = _bound(topic, partition)
        return any(hmac.compare_digest(signature, sign(k, bound, key, value)) for k in self._keys)

    def valid_event(self, event: Any) -> bool:
        """:meth:`valid` for a Faust event (its message's topic, key, value and headers)."""
        message = event.message
        return self.valid(message.topic, message.key, message.value, message.headers)

    def valid_state_record(self, event: Any) -> bool:
        """:meth:`valid` for a changelog record, which is signed for the partition it was written to."""
        message = event.message
        return self.valid(message.topic, message.key, message.value, message.headers, message.partition)


def settings_worker_keys(settings: Any) -> list[bytes]:
    """:func:`worker_keys` from the settings object (``SYNTHWATCH_WORKER_KEY``, ``_KEY_FILE``, ``WORKERS``)."""
    configured = settings.worker_key.get_secret_value() if settings.worker_key else None
    return worker_keys(configured, settings.worker_key_file, settings.data_dir, settings.workers)


def existing_worker_keys(settings: Any) -> list[bytes] | None:
    """The worker keys a process other than the worker may use, never made here: configured, from the key
    file, or the data directory's existing key; None when there is none (a publisher then signs nothing)."""
    if settings.worker_key or settings.worker_key_file:
        return settings_worker_keys(settings)
    path = Path(settings.data_dir) / "worker-key"
    return [worker_key(None, Path(settings.data_dir))] if path.exists() else None


def worker_keys(configured: str | None, key_file: Path | None, data_dir: Path, workers: int = 1) -> list[bytes]:
    """The worker keys, newest first: configured (hex, comma-separated), from a key file, or this data
    directory's own (made on first use, 0600; refused when ``workers`` > 1, as each worker would make its own)."""
    try:
        if configured:
            keys = [parse_key(part, "SYNTHWATCH_WORKER_KEY") for part in configured.split(",") if part.strip()]
        elif key_file is not None:
            keys = _keys_from_file(key_file)
        elif workers > 1:
            raise WorkerKeyError(
                f"SYNTHWATCH_WORKERS={workers} but no worker key is set: each worker would make its own and refuse "
                "the others' records; set SYNTHWATCH_WORKER_KEY (or SYNTHWATCH_WORKER_KEY_FILE) to the same "
                "`openssl rand -hex 32` on every worker"
            )
        else:
            return [worker_key(None, data_dir)]
    except OrgKeysError as error:
        raise WorkerKeyError(str(error)) from error
    if not keys:
        raise WorkerKeyError("SYNTHWATCH_WORKER_KEY / SYNTHWATCH_WORKER_KEY_FILE holds no key")
    return keys


def _keys_from_file(path: Path) -> list[bytes]:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as error:
        raise WorkerKeyError(f"SYNTHWATCH_WORKER_KEY_FILE {path}: {error.strerror}") from error
    if others_can_reach(mode):
        raise WorkerKeyError(f"{path} holds the worker keys but other users can read or change it: `chmod 600 {path}`")
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [parse_key(line, f"{path}: line {n}") for n, line in enumerate(lines, 1) if line]


def worker_key(configured: str | None, data_dir: Path) -> bytes:
    """The configured key (hex), or this data directory's own, made on first use (0600)."""
    if configured:
        return parse_key(configured, "SYNTHWATCH_WORKER_KEY")
    path = data_dir / "worker-key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker on this data directory made it meanwhile
            pass
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32))
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise WorkerKeyError(f"{path}: {error.strerror}") from error
    if others_can_reach(mode):  # made 0600; loosened or copied since: whoever reads it can forge alerts
        raise WorkerKeyError(f"{path} holds the worker key but other users can read or change it: `chmod 600 {path}`")
    return parse_key(path.read_text().strip(), str(path))
