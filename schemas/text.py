"""Characters that must not travel from a report into a terminal, an e-mail line or a log line.

C0 and C1 control characters (newline, ESC, the OSC-8 hyperlink introducer...) and the Unicode line and
paragraph separators let a report forge a line in a plain-text e-mail or rewrite what a terminal shows;
bidirectional overrides and isolates reorder what is displayed ("Trojan Source"). The wire contract refuses
them in its text fields (:data:`FORBIDDEN_PATTERN`); everything shown to people goes through :func:`visible`,
because stored extras, older rows and other producers' records never went through that check.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime
from typing import Any

#: Bidirectional embeddings, overrides and isolates: refused at ingest and removed on output.
BIDI_OVERRIDES = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
#: All bidi formatting marks (the overrides plus LRM, RLM, ALM): removed on output.
BIDI_MARKS = BIDI_OVERRIDES + "\u200e\u200f\u061c"

#: Unicode's line and paragraph separators: not control characters, but a line break to many readers (JavaScript,
#: Python's ``splitlines``, some mail clients): "3-MMC\u2028Severity: CRITICAL" forged a second line.
LINE_SEPARATORS = "\u2028\u2029"

_FORBIDDEN_CLASS = "\x00-\x1f\x7f-\x9f" + LINE_SEPARATORS + BIDI_OVERRIDES
#: For pydantic's ``pattern=`` (pydantic-core's Rust regex): a text with none of the refused characters.
FORBIDDEN_PATTERN = f"^[^{_FORBIDDEN_CLASS}]*$"
_FORBIDDEN = re.compile(f"[{_FORBIDDEN_CLASS}]")
_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f{LINE_SEPARATORS}]")
_BIDI = re.compile(f"[{BIDI_MARKS}]")


def first_forbidden(value: str) -> str | None:
    """The first refused character of ``value`` as ``U+XXXX (NAME)``, or None when there is none."""
    match = _FORBIDDEN.search(value)
    if match is None:
        return None
    char = match.group()
    return f"U+{ord(char):04X} ({unicodedata.name(char, 'control character')}) at position {match.start()}"


def visible(text: object) -> str:
    """``text`` on one line with every control character shown as an escape (``\\n``, ``\\x1b``) and bidi
    marks removed: what a reader sees is what the data holds, and nothing reaches the terminal as a command."""
    value = str(text)
    value = _BIDI.sub("", value)
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)


def jsonable(value: Any) -> Any:
    """A value as JSON has it: datetimes and dates in ISO 8601, tuples as lists, bytes as text (the /sql
    endpoint's rows and every command's ``--format json`` go through it)."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
