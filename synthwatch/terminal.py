"""Printing data in the terminal: as plain Rich ``Text``, never as markup, emoji codes or control sequences.

A substance named ``[/]`` crashed ``alerts``, ``stats`` and ``deliveries`` (Rich MarkupError),
``[link=...]`` became a hidden hyperlink, ``:x:`` an emoji, and ESC / OSC-8 sequences reached the
terminal. Our own wording may use markup; anything that came from data is wrapped by :func:`plain`.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from synthwatch.schemas.text import visible


def plain(value: Any, style: str = "") -> Text:
    """Data as Rich text: no markup, no emoji, control characters escaped and bidi marks removed."""
    return Text("" if value is None else visible(value), style=style)


def console(*, stderr: bool = False, width: int | None = None) -> Console:
    """A console that never turns ``:name:`` into an emoji (our markup still works, data goes through plain)."""
    return Console(stderr=stderr, emoji=False, width=width)


def say(target: Console, markup: str, *data: Any, style: str = "") -> None:
    """Print our own ``markup`` followed by data values, each as :func:`plain` text."""
    line = Text.from_markup(markup, emoji=False)
    for value in data:
        line.append_text(plain(value, style=style))
    target.print(line, soft_wrap=True, highlight=False)
