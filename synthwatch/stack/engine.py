"""Starting the embedded engine as a process of its own (:mod:`synthwatch.stream_apps.storage.engine_server`).

Why: a worker that talks to the engine over HTTP carries neither the engine's code and heap nor its insert
CPU (docs/performance.md, "The engine out of the worker"). The engine process gets a random password at
start, in its environment (never on its command line); whoever starts it passes :meth:`EngineProcess.url`
(which holds the password) to the worker in the worker's environment, never in a log.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from synthwatch.stack.process import StackProcess, StackProcessError
from synthwatch.stream_apps.storage.engine_server import PASSWORD_ENV, USER


class EngineProcess:
    """The engine for ``path`` in a child process on a loopback port, with a password made for this start."""

    def __init__(self, path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        import os

        self.path = Path(path)
        self.password = secrets.token_urlsafe(32)
        self._port_file = self.path.parent / f".{self.path.name}.port"
        child_env = dict(os.environ if env is None else env)
        child_env[PASSWORD_ENV] = self.password
        self.child = StackProcess(
            [
                sys.executable,
                "-m",
                "synthwatch.stream_apps.storage.engine_server",
                str(self.path),
                str(self._port_file),
            ],
            log_path,
            env=child_env,
            what="engine process",
            stop_timeout=30,
        )
        self.port = 0

    @property
    def pid(self) -> int:
        return self.child.pid

    def url(self, database: str, port: int | None = None) -> str:
        """``http://user:password@127.0.0.1:port/database``: what the worker's ``SYNTHWATCH_CLICKHOUSE_URL`` gets
        (``port``: another one in front of the engine's, a proxy's)."""
        return f"http://{USER}:{self.password}@127.0.0.1:{port or self.port}/{database}"

    def start(self, timeout: float = 120.0) -> Self:
        """Start the process and wait until it listens (it writes its port once it does)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._port_file.unlink(missing_ok=True)
        self.child.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child.poll() is not None:
                raise StackProcessError(self.child.failure(f"exited with code {self.child.poll()}"))
            if self._port_file.exists():
                self.port = int(self._port_file.read_text(encoding="utf-8"))
                return self
            time.sleep(0.05)
        self.child.stop()
        raise StackProcessError(self.child.failure(f"was not listening after {timeout:.0f} s"))

    def stop(self) -> int | None:
        """Stop the process (SIGTERM: it closes the engine), SIGKILL after 30 s."""
        code = self.child.stop()
        self._port_file.unlink(missing_ok=True)
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
