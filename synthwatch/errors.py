"""The one base of synthwatch's own exceptions.

Each package keeps its exceptions beside the code that raises them (``QueryError`` in storage/query.py,
``WireError`` in schemas/wire.py, ...); each derives from :class:`SynthwatchError` as well as from the built-in
it always had (``class QueryError(SynthwatchError, RuntimeError)``), so every ``except RuntimeError`` still
catches what it caught, and a caller that wants "anything synthwatch refused" catches one class.
"""

from __future__ import annotations


class SynthwatchError(Exception):
    """Something synthwatch refused or could not do; the message says what to do next."""
