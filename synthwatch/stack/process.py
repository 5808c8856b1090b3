"""A synthwatch child process (``synthwatch up``, ``worker``, a benchmark's helper): start it with its output
in a log file, wait until it has written ``stack.json``, and stop it: SIGTERM, then SIGKILL.

Why one class: the CLI's demo, the benchmarks and the tests each start stacks as child processes, and each
had its own copy of the start / wait-for-``stack.json`` / stop loop. A copy that forgot to reap the child,
to check whether it had already exited, or to name the log in its error, left the reader guessing.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from synthwatch.errors import SynthwatchError
from synthwatch.settings import Settings
from synthwatch.stackfile import StackInfo, read_stack


class StackProcessError(SynthwatchError, RuntimeError):
    """The child process exited, or was not ready in time; the message names its log file."""


def stop_child(
    process: subprocess.Popen[bytes], timeout: float = 30.0, kill_wait: float = 10.0, sig: int = signal.SIGTERM
) -> int:
    """Send ``sig`` (SIGTERM: a graceful stop) to a child, SIGKILL it if it has not exited in ``timeout`` s,
    and reap it; returns its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(kill_wait)
    return int(process.returncode)


def log_tail(path: Path, size: int = 2000) -> str:
    """The last ``size`` bytes of a log, as text ('' when it cannot be read)."""
    with contextlib.suppress(OSError):
        return path.read_bytes()[-size:].decode(errors="replace")
    return ""


class StackProcess:
    """One child process whose stdout and stderr go to ``log_path`` (or stdout to a pipe, see ``pipe_stdout``).

    ``settings``: the child's settings, whose ``DATA_DIR/stack.json`` says when it is ready (a ``worker`` or
    ``up``); without them :meth:`wait_ready` cannot be used. ``what`` names the process in errors. Used as a
    context manager it is started on entry and stopped (SIGTERM, ``stop_timeout`` s, then SIGKILL) on exit.
    Errors end with the last ``tail`` bytes of the log (0: only its path).
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        settings: Settings | None = None,
        what: str | None = None,
        stop_timeout: float = 30.0,
        kill_wait: float = 10.0,
        pipe_stdout: bool = False,
        stdin: int | None = None,
        cwd: Path | None = None,
        tail: int = 2000,
        pass_fds: Sequence[int] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.settings = settings
        self.what = what or f"`{' '.join(self.argv)}`"
        self.stop_timeout = stop_timeout
        self.kill_wait = kill_wait
        self.pipe_stdout = pipe_stdout
        self.stdin = stdin
        self.cwd = cwd
        self.tail = tail
        self.pass_fds = tuple(pass_fds)  # descriptors the child inherits (a listening socket)
        self.preexec_fn = preexec_fn  # e.g. broker.die_with_parent()
        self._process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() when the process was started

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise StackProcessError(f"{self.what} was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> IO[bytes] | None:
        """The child's stdout when ``pipe_stdout`` (else it goes to the log)."""
        return self.process.stdout

    def poll(self) -> int | None:
        return self.process.poll()

    def start(self) -> Self:
        """Start the child with its output in the log file (created or truncated)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=subprocess.PIPE if self.pipe_stdout else log,
                stderr=log if self.pipe_stdout else subprocess.STDOUT,
                stdin=self.stdin,
                cwd=self.cwd,
                pass_fds=self.pass_fds,
                preexec_fn=self.preexec_fn,
            )
        return self

    def ready_info(self) -> StackInfo | None:
        """The child's ``stack.json`` once it says the child is ready, else None; StackProcessError if it exited."""
        if self.settings is None:
            raise StackProcessError(f"{self.what}: no settings given, so no stack.json to wait for")
        process = self.process
        if process.poll() is not None:
            raise StackProcessError(self.failure(f"exited with code {process.returncode}"))
        info = read_stack(self.settings)
        if info is not None and info.pid == process.pid and info.ready_seconds is not None:
            return info
        return None

    def wait_ready(self, timeout: float, interval: float = 0.1) -> StackInfo:
        """Poll ``stack.json`` until the child is ready; StackProcessError naming the log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.ready_info()
            if info is not None:
                return info
            time.sleep(interval)
        raise StackProcessError(self.failure(f"was not ready after {timeout:.0f} s"))

    def failure(self, what_happened: str) -> str:
        """An error naming the process, what happened, its log file and (``tail`` bytes) the log's end."""
        message = f"{self.what} {what_happened} (log: {self.log_path})"
        return f"{message}:\n{log_tail(self.log_path, self.tail)}" if self.tail else message

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Stop the child gracefully (``sig``), SIGKILL it after ``timeout`` s (default ``stop_timeout``); its code."""
        if self._process is None:
            return None
        code = stop_child(self._process, self.stop_timeout if timeout is None else timeout, self.kill_wait, sig)
        if self._process.stdout is not None:
            self._process.stdout.close()
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
