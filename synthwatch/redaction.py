"""One place that hides secrets before text leaves the process, and writes files only their owner reads.

Why one helper: a ClickHouse URL with its password was printed by ``synthwatch status`` and kept in a
0644 ``stack.json``, and webhook URLs kept ``user:password@`` in the deliveries table. Everything that
shows or stores a URL or an error message (status, logs, tables, exceptions) goes through
:func:`redact`, so a new place cannot forget one kind of secret.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from synthwatch.schemas.text import visible

MASK = "***"

#: ``scheme://user:password@`` anywhere in a text; the password is replaced, the user kept.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")
#: ``password=...``, ``token: ...`` and the like in query strings, DSNs and messages.
_SECRET_WORDS = r"pass(?:word|wd)?|secret|token|api[_-]?key|access[_-]?key|sig(?:nature)?|authorization"
_ASSIGNMENT = re.compile(
    rf"(?P<key>(?<![A-Za-z0-9])(?:{_SECRET_WORDS})(?![A-Za-z0-9])\s*[=:]\s*)(?P<quote>['\"]?)(?:Bearer\s+)?(?P<value>[^\s&'\",;]+)",
    re.IGNORECASE,
)
_SECRET_KEYS = re.compile(rf"^(?:{_SECRET_WORDS})$", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every password in a URL and every ``password=``/``token=`` value replaced by ``***``."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _ASSIGNMENT.sub(lambda m: f"{m['key']}{m['quote']}{MASK}", text)


def redact_url(url: str) -> str:
    """A URL fit to show or store: no password in its user part, no secret-looking query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_KEYS.match(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _one_line(value: object) -> object:
    """A log argument that may carry input text (a string, an exception's message) with control characters
    escaped (``\\n``, ``\\x1b``): a report field cannot start a forged log line or drive a terminal."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, BaseException):
        return visible(str(value))
    return value


def safe_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as the logging module prints it, with each exception's message redacted and kept
    on one line: the message may carry input text (a report field, a URL with its password). The frames are
    source code: they keep their lines, redacted too (a literal secret in code is still a secret).

    Python's own :class:`traceback.TracebackException` does the layout, so causes, contexts, notes and
    exception groups (asyncio's TaskGroup raises them) print as Python prints them; only the texts that
    come from the exceptions are cleaned first.
    """
    summary = traceback.TracebackException.from_exception(exc)
    pending, seen = [summary], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        # _str: the message format_exception_only prints (no public setter; the same name in 3.11 to 3.13)
        node._str = visible(redact(node._str))  # type: ignore[attr-defined]
        notes = getattr(node, "__notes__", None)
        if notes:
            node.__notes__ = [visible(redact(str(note))) for note in notes]
        if getattr(node, "text", None):  # a SyntaxError's offending line
            node.text = visible(redact(node.text))
        pending.extend(n for n in (node.__cause__, node.__context__) if n is not None)
        pending.extend(getattr(node, "exceptions", None) or ())
    return redact("".join(summary.format())).rstrip("\n")


#: Our modules that subclass Faust's services (App, Recovery, Worker): Faust's own messages (multi-line tables
#: among them) are logged under these names, so they are treated like Faust's: only their arguments escaped.
_FAUST_SERVICES = frozenset(
    {"synthwatch.stream_apps.runtime.transport", "synthwatch.stack.drain", "synthwatch.stack.service_worker"}
)


class _RedactingRecordFactory:
    """Wraps logging's record factory: every record's message is redacted once, before any handler, and
    kept on one line (log injection: a newline in a report field forged a whole log line).

    Arguments (where input text arrives) are escaped for every logger; the whole message too for
    synthwatch's own loggers, whose messages are one line by design. Faust's and aiokafka's messages
    may hold multi-line tables of their own, so only their arguments are escaped. A traceback's frames
    stay multi-line, but each exception's message in it is redacted and kept on one line
    (:func:`safe_traceback`): an exception raised on a report field or a URL carries them.
    """

    def __init__(self, inner: logging._LogRecordFactory) -> None:  # type: ignore[name-defined]
        self.inner = inner

    def __call__(self, *args: object, **kwargs: object) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            # formatters keep an exc_text already set instead of formatting the exception themselves
            record.exc_text = safe_traceback(record.exc_info[1])
        if isinstance(record.args, tuple):
            record.args = tuple(_one_line(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _one_line(v) for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except Exception:  # a broken format string stays the handler's problem, as before
            return record
        cleaned = redact(message)
        if (
            record.name == "synthwatch" or record.name.startswith("synthwatch.")
        ) and record.name not in _FAUST_SERVICES:
            cleaned = visible(cleaned)
        if cleaned != message:
            # (), not None: mode's formatter (Faust's worker logging) turns None into (None,) and formats again
            record.msg, record.args = cleaned, ()
        return record


def install_log_redaction() -> None:
    """Redact every log record of this process (Faust, aiokafka, ours); idempotent."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(factory))


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: the data directory holds data and secrets."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically to a file only its owner can read (0600 from creation, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
