"""How commands find the running stack: ``DATA_DIR/stack.json``, written by ``up`` and ``worker``.

The embedded broker listens on a free port and the embedded ClickHouse directory can be open in only
one process, so ``publish``, ``sql`` and the read commands look here to learn the broker address and
the HTTP port of the process that owns the engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from synthwatch.errors import SynthwatchError
from synthwatch.redaction import private_dir, redact_url, write_private
from synthwatch.settings import Settings


class NoBrokerConfigured(SynthwatchError, RuntimeError):
    """No Kafka address is configured and no embedded stack is running."""


@dataclass(frozen=True, slots=True)
class StackInfo:
    pid: int
    bootstrap_servers: str
    web_url: str
    clickhouse_url: str  # redacted: no password (the file is 0600 all the same)
    started_at: str
    ready_seconds: float | None = None
    broker_pid: int | None = None  # the embedded broker `up` started, if any


def stack_file(settings: Settings) -> Path:
    return settings.data_dir / "stack.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_stack(settings: Settings, info: StackInfo) -> None:
    """Describe the running stack for other commands: data dir 0700, file 0600, no password in it."""
    private_dir(settings.data_dir)
    safe = StackInfo(**{**asdict(info), "clickhouse_url": redact_url(info.clickhouse_url)})
    write_private(stack_file(settings), json.dumps(asdict(safe), indent=2))


def web_token_file(settings: Settings) -> Path:
    """Where the running stack keeps its ``/sql`` token (0600, readable by the user that started it)."""
    return settings.data_dir / "web-token"


def new_web_token(settings: Settings) -> str:
    """A fresh random token for the worker's ``/sql`` endpoint, written 0600 for the CLI of the same user.

    New at every start, so a token leaked from an earlier run is worth nothing.
    """
    token = secrets.token_urlsafe(32)
    private_dir(settings.data_dir)
    write_private(web_token_file(settings), token + "\n")
    return token


def read_web_token(settings: Settings) -> str | None:
    """The running stack's ``/sql`` token, or None when this user cannot read it (or none exists)."""
    try:
        return web_token_file(settings).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, PermissionError):
        return None


def remove_stack(settings: Settings, pid: int) -> None:
    """Remove the stack file if it is ours (another process may have replaced it)."""
    info = read_stack(settings, require_alive=False)
    if info is not None and info.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            stack_file(settings).unlink()


def read_stack(settings: Settings, require_alive: bool = True) -> StackInfo | None:
    """The running stack's description, or None when none is running (stale files are ignored)."""
    try:
        data = json.loads(stack_file(settings).read_text(encoding="utf-8"))
        info = StackInfo(**data)
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError):  # no file, or DATA_DIR is not a dir
        return None
    if require_alive and not _alive(info.pid):
        return None
    return info


def bootstrap_servers(settings: Settings) -> str:
    """Kafka address: the configured one, else the running embedded stack's."""
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    info = read_stack(settings)
    if info is None:
        raise NoBrokerConfigured(
            "no Kafka broker: start the embedded stack with `synthwatch up` (same data directory: "
            f"{settings.data_dir}) or set SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS=host:9092"
        )
    return info.bootstrap_servers
