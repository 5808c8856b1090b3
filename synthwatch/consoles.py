"""The consoles commands print through: wrapped for a person at a terminal, never for a pipe or a file.

Why: Rich sizes a console from the terminal it finds on the process's standard streams (or 80 columns
when there is none), even when the console itself writes to a pipe. Output captured by a script, a log
or a test was then cut at whatever width the surrounding terminal had ("11/11\\npanels"), so what a
command printed depended on where it ran. A :class:`CommandConsole` decides at each print: a terminal
gets Rich's usual width; anything else gets lines as long as their content.
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

#: Width of a console that does not write to a terminal: no table of ours comes near it, so no cell or
#: line is wrapped, and tables still take only the width they need (they do not expand).
PIPE_WIDTH = 4096


class CommandConsole(Console):
    """A Rich console whose width is the terminal's at a terminal, and unbounded otherwise."""

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size at a terminal; :data:`PIPE_WIDTH` columns when writing anywhere else."""
        if self.is_terminal:
            return super().size
        return ConsoleDimensions(PIPE_WIDTH, super().size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def command_console(stderr: bool = False) -> Console:
    """The console a command prints its results (or, with ``stderr``, its errors) through."""
    return CommandConsole(stderr=stderr, emoji=False)  # data is printed as plain text (synthwatch.terminal)
