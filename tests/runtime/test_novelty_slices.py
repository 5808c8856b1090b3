"""The novelty agent judges a batch in slices of whole messages, in the order read."""

from __future__ import annotations

from typing import Any

from synthwatch.stream_apps.runtime.agents.novelty import SLICE_SIGHTINGS, slices


def _read(sizes: list[int]) -> list[tuple[Any, list[tuple[Any, Any]]]]:
    """Messages (named by index) each holding ``size`` sightings (named (message, n))."""
    return [(m, [((m, n), ("sightings:0", m)) for n in range(size)]) for m, size in enumerate(sizes)]


def test_slices_keep_messages_whole_and_in_order_and_lose_nothing() -> None:
    sizes = [1, 70, 3, 0, 30, 30, 5, SLICE_SIGHTINGS, 2]
    read = _read(sizes)
    got = list(slices(read))
    # every message once, in order, its sightings with it and never split over two slices
    assert [m for events, _ in got for m in events] == list(range(len(sizes)))
    assert [s for _, taken in got for s, _ in taken] == [s for _, of in read for s, _ in of]
    for events, taken in got:
        assert [s for s, _ in taken] == [s for m in events for s, _ in read[m][1]]
    # a slice closes once it holds SLICE_SIGHTINGS or more: all but the last reached it, and only by its last message
    for events, taken in got[:-1]:
        assert len(taken) >= SLICE_SIGHTINGS
        assert len(taken) - sizes[events[-1]] < SLICE_SIGHTINGS
    assert SLICE_SIGHTINGS != 64 or [events for events, _ in got] == [[0, 1], [2, 3, 4, 5, 6], [7], [8]]


def test_a_message_without_sightings_is_still_handed_on_to_be_acknowledged() -> None:
    assert list(slices(_read([0]))) == [([0], [])]
    assert list(slices([])) == []
