"""Starting the embedded engine as a process of its own (:mod:`synthwatch.stream_apps.storage.engine_server`).

Why: a worker that talks to the engine over HTTP carries neither the engine's code and heap nor its insert
CPU (docs/performance.md, "The engine out of the worker"). The engine process gets a random password at
start, in its environment (never on its command line); whoever starts it passes :meth:`EngineProcess.url`
(which holds the password) to the worker in the worker's environment or settings, never in a log.

The listening socket is bound here, on loopback, and handed to the child: the port is known at once, no
other process can take it meanwhile, and a client that connects while the engine still opens waits in the
socket's backlog (the worker's first statement simply takes longer) instead of being refused.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Self

from synthwatch.stack.broker import die_with_parent
from synthwatch.stack.process import StackProcess
from synthwatch.stream_apps.storage.engine_server import PASSWORD_ENV, USER

#: The setting ``clickhouse_engine_max_requests`` in the engine process's environment.
MAX_REQUESTS_ENV = "SYNTHWATCH_CLICKHOUSE_ENGINE_MAX_REQUESTS"


class EngineProcess(StackProcess):
    """The engine for ``path`` in a child process on a loopback port, with a password made for this start.

    ``tied_to_parent``: the kernel kills it when the thread that started it exits (``synthwatch up`` killed
    hard must not leave a process holding the engine directory); only from a process without other threads.
    As a context manager it is started on entry and stopped (SIGTERM, 30 s, then SIGKILL) on exit.
    ``max_requests``: the requests it runs at once (``clickhouse_engine_max_requests``; None: that setting in its
    environment, else its default).
    """

    def __init__(
        self,
        path: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        *,
        tied_to_parent: bool = False,
        max_requests: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.password = secrets.token_urlsafe(32)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        child_env = dict(os.environ if env is None else env)
        child_env[PASSWORD_ENV] = self.password
        if max_requests is not None:
            child_env[MAX_REQUESTS_ENV] = str(max_requests)
        fd = self._listener.fileno()
        super().__init__(
            [sys.executable, "-m", "synthwatch.stream_apps.storage.engine_server", str(self.path), str(fd)],
            log_path,
            env=child_env,
            what="engine process",
            stop_timeout=30,
            pass_fds=(fd,),
            preexec_fn=die_with_parent() if tied_to_parent else None,
        )

    def url(self, database: str, port: int | None = None) -> str:
        """``http://user:password@127.0.0.1:port/database``: what the worker's ``SYNTHWATCH_CLICKHOUSE_URL`` gets
        (``port``: another one in front of the engine's, a proxy's)."""
        return f"http://{USER}:{self.password}@127.0.0.1:{port or self.port}/{database}"

    def start(self) -> Self:
        """Start the process; returns at once (clients connecting before it serves wait in the backlog)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            super().start()
        finally:
            self._listener.close()  # the child has its copy: this process never accepts on it
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Stop the process (SIGTERM: it closes the engine), SIGKILL after 30 s; its exit code."""
        self._listener.close()
        return super().stop(sig, timeout)
