"""Idempotent replay: every detector state record remembers the input offsets it has applied.

Why: a worker killed mid-checkpoint leaves some of the checkpoint's state records written and others
not, and the group's committed offsets lag the written state anyway (offsets are committed once a
second, after the checkpoint). The restarted worker replays from the committed offsets, so a replayed
event can meet a record that already holds it (applying it twice changes counts, episodes and
alerts) next to one that does not (skipping it there loses it). A record that stores, per input
partition, the offset of the last event it applied answers "has this event been applied here?"
exactly, whatever else was written: replay skips the event for that record and applies it to the
others, so after recovery every record holds each event once, as if the worker had never died.

An event's outputs (alerts, sightings, rejects) are acknowledged by the broker before any record that
holds it is written (see :mod:`.checkpoints`), so skipping it for a record never loses an alert.

Pure (no Faust, no Kafka): positions are plain ``("topic:partition", offset)`` pairs.
"""

from __future__ import annotations

#: Where an event was read: ("topic:partition", offset).
Position = tuple[str, int]


def position_of(source: str) -> Position | None:
    """The position of a ``topic:partition:offset`` source; None for any other source (a file line)."""
    where, _, offset = source.rpartition(":")
    if not where or ":" not in where or not offset.isdigit():
        return None
    return where, int(offset)


def applied(marks: dict[str, int], at: Position | None) -> bool:
    """Whether a record with these marks already holds the event read at ``at``."""
    if at is None:
        return False
    mark = marks.get(at[0])
    return mark is not None and at[1] <= mark


def note(marks: dict[str, int], at: Position | None) -> None:
    """Remember that the record now holds the event read at ``at`` (and every earlier one there)."""
    if at is not None:
        mark = marks.get(at[0])
        if mark is None or at[1] > mark:
            marks[at[0]] = at[1]


def apply_once(marks: dict[str, int], at: Position | None) -> bool:
    """True (and noted) if the event at ``at`` is new to the record; False if the record holds it already.
    An event with no position (a file line: the backtest) is always new, and nothing is noted."""
    if at is None:
        return True
    if applied(marks, at):
        return False
    note(marks, at)
    return True


def marks_of(record: dict[str, object], key: str = "a") -> dict[str, int]:
    """The marks stored in a state record (none in records written before marks existed)."""
    stored = record.get(key)
    if not isinstance(stored, dict):
        return {}
    return {str(where): int(offset) for where, offset in stored.items()}
