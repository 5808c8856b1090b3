"""Offline backtest: the worker's detector core over an NDJSON file, in file order, with no broker.

Malformed lines, lines dated past their receipt (``received_at``: refused as the worker refuses them) and
duplicates are counted and skipped (never fatal); rejects go to a file beside the output so nothing is lost
silently. A late report counts as an event (the worker stores it, flagged),
and ``late`` says how many events were late.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from synthwatch.schemas import Alert, BorderSeizure, Reject, WireError
from synthwatch.schemas.wire import RecordLimits, check_event_time, parse_limited
from synthwatch.stream_apps.detect.identity import Structure, grams_of, remember_structures, structure_from_smiles
from synthwatch.stream_apps.detect.intake import Intake
from synthwatch.stream_apps.detect.region import (
    DetectionConfig,
    Detector,
    Observation,
    ObservationFields,
)


@dataclass
class BacktestSummary:
    lines: int = 0
    events: int = 0
    malformed: int = 0
    duplicates: int = 0
    late: int = 0  # of ``events``: stored and flagged late, left out of spike series
    alerts: int = 0
    seconds: float = 0.0
    alerts_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.lines / self.seconds if self.seconds else 0.0


@dataclass
class BacktestRun:
    alerts: list[Alert]
    rejects: list[Reject]
    summary: BacktestSummary


def run_lines(
    lines: Iterable[tuple[str, str]],
    config: DetectionConfig | None = None,
    detector: Detector | None = None,
    intake: Intake | None = None,
    stored: set[str] | None = None,
    progress: Callable[[int], None] | None = None,
    received_at: datetime | None = None,
) -> BacktestRun:
    """Detect over ``(source, line)`` pairs; returns alerts, rejects and counts that add up.

    ``received_at``: when the lines were received (a line records no receipt time; the command gives the file's
    modification time): a line whose event time is more than ``intake.limits.max_future_hours`` after it is
    refused, as the worker refuses a record past its Kafka timestamp. None: no such bound.

    ``detector``, ``intake`` and ``stored`` (:func:`~.region.report_id` of the reports stored before, grown
    with every event taken) continue from
    a state built elsewhere, e.g. rebuilt from ClickHouse: how the tests check that rebuild-then-live raises
    the alerts of one backtest over everything. ``progress`` (a progress bar's advance) hears how many
    lines are done, a block at a time, once the detector is through them: not when they are read, which
    ran up to four blocks ahead of detection in the second process.
    """
    ahead, helped = _with_structures_ahead(lines)  # the helper starts on the first block while the catalogue loads
    try:
        # A stream of several blocks, with no state handed in, is detected in a second process (see
        # _DetectionProcess); a caller's detector and id set stay here, where the caller sees them change.
        separate = helped and detector is None and stored is None and _fork_is_safe()
        return _run(ahead, config, detector, intake, stored, separate, progress, received_at)
    finally:
        ahead.close()  # stops the helper processes even when building the resolver failed


def _run(
    lines: Iterable[tuple[str, str]],
    config: DetectionConfig | None,
    detector: Detector | None,
    intake: Intake | None,
    stored: set[str] | None,
    separate: bool = False,
    progress: Callable[[int], None] | None = None,
    received_at: datetime | None = None,
) -> BacktestRun:
    intake = intake or Intake(stage="backtest")
    summary, alerts, rejects = BacktestSummary(), [], []
    started = time.perf_counter()
    sink: _DetectionProcess | _InProcess = (
        _DetectionProcess(config, progress)
        if separate
        else _InProcess(detector or Detector(config), stored if stored is not None else set(), progress)
    )
    gc_was_enabled = gc.isenabled()
    gc.disable()  # ~10 short-lived objects per line and a growing state: the cyclic collector only costs
    try:
        block: list[ObservationFields] = []
        size = _first_block_lines()  # a short first block: the detector starts sooner
        sent_lines = 0  # lines (malformed ones too) up to the last block sent: each block reports its share
        # Per line: what ``Observation.fields_of(intake.enrich(event, source))`` gives, without the
        # EnrichedEvent and NormalisedQuantity it would build only to take them apart (the reader's CPU bounds
        # the command's wall time on 2 cores; see docs/performance.md).
        identify, fields_from, read = intake.identify, Observation.fields_from, 0
        limits = intake.limits
        for source, line in lines:
            read += 1
            try:
                event = parse_limited(line)  # the worker's record caps (their defaults), as the worker applies them
                check_event_time(event, received_at, limits)  # the worker's bound on event times
            except WireError as error:
                summary.malformed += 1
                rejects.append(
                    Reject.of(line, source=source, reason=error.reason, stage="backtest", event_id=error.event_id)
                )
            else:
                substance = identify(event)
                grams = (
                    grams_of(event.quantity.value, event.quantity.unit) if isinstance(event, BorderSeizure) else None
                )
                block.append(fields_from(event, substance, grams))
            # A block ends where one of the structure helper's ends, so it is sent before the next line is asked for
            # (which waits for the helper's answers for the next block). Cut at so many observations, the first block
            # (1,024 lines, the helper's first part) waited for the helper's second part whenever one of its lines was
            # malformed; cut at 4,096 lines after the first, every later block ended 1,024 lines into the helper's
            # next one, so at each of its boundaries the detector waited for the helper with 3,072 lines read.
            if read - sent_lines >= size:
                sink.send(block, read - sent_lines)
                block, size, sent_lines = [], _BLOCK_LINES - read % _BLOCK_LINES, read
        summary.lines = read
        if block or read > sent_lines:
            sink.send(block, read - sent_lines)
        for found in sink.results():
            alerts.extend(found.alerts)
            summary.events += found.events
            summary.duplicates += found.duplicates
            summary.late += found.late
    finally:
        sink.close()
        if gc_was_enabled:
            gc.enable()
    summary.seconds = time.perf_counter() - started
    summary.alerts = len(alerts)
    for alert in alerts:
        summary.alerts_by_type[alert.alert_type] = summary.alerts_by_type.get(alert.alert_type, 0) + 1
    return BacktestRun(alerts, rejects, summary)


# --- the detector core beside the reader --------------------------------------------------------------
#
# Reading, validating and resolving a line costs about a third of what detecting it does, and both run
# in one order-dependent sequence each: the reader's (the resolver learns names) and the detector's. So a
# second process detects block k while this one reads block k + 1. It gets the same observations in the
# same order (blocks are numbered, and a block out of order is an error, not a silent reordering) and
# runs the same function as the in-process path (_observe_all), so the alerts and counts are the same.


@dataclass(slots=True)
class _Found:
    """What detecting one block gave: its alerts in order, and how its events were counted."""

    alerts: list[Alert]
    events: int
    duplicates: int
    late: int


def _observe_all(detector: Detector, seen: set[str], observations: Iterable[Observation]) -> _Found:
    """Both stages over observations in order; ``seen`` (:func:`report_id` of the events taken: reporter and
    event id, as the worker's sink looks them up) grows with every event taken (see :meth:`Detector.observe_all`)."""
    return _Found(*detector.observe_all(observations, seen))


class _InProcess:
    """Detects each block as it comes, in this process (small inputs, or a caller's detector and ids)."""

    def __init__(self, detector: Detector, seen: set[str], progress: Callable[[int], None] | None = None) -> None:
        self.detector, self.seen, self.found = detector, seen, _Found([], 0, 0, 0)
        self.progress = progress

    def send(self, block: list[ObservationFields], lines: int = 0) -> None:
        """Detect ``block``; ``lines``: how many input lines it stands for (malformed ones too), for progress."""
        found = _observe_all(self.detector, self.seen, Observation.all_from(block))
        self.found.alerts.extend(found.alerts)
        self.found.events += found.events
        self.found.duplicates += found.duplicates
        self.found.late += found.late
        if self.progress is not None and lines:
            self.progress(lines)

    def results(self) -> Iterator[_Found]:
        yield self.found

    def close(self) -> None:
        pass


# The detection process's state: [detector, ids taken, number of the next block] (set by _start_detection).
_DETECTION: list[Any] = []


def _start_detection(config: DetectionConfig | None) -> None:
    gc.disable()  # as in the reader: a growing state of small objects, no cycles worth collecting
    _one_blas_thread()
    detector = Detector(config)
    # The first new substance would build the catalogue's fingerprints (~0.15 s, it names the nearest ones):
    # built now, while the reader still waits for the first block. The same index either way (catalogue only).
    detector.novelty.similarity  # noqa: B018 (the property builds it)
    _DETECTION[:] = [detector, set(), 0]


def _one_blas_thread() -> None:
    """Numpy, imported here with the similarity index (RDKit's fingerprint generator imports it), runs no BLAS routine
    in this process (the index scores with RDKit's own Tanimoto), but its OpenBLAS starts a thread per core that spins
    for ~50 ms once imported: ~0.05-0.09 CPU s of every backtest, at its start, where the reader waits for the
    structure helper's first answers, which it slowed. One thread: none started. Only in this forked process, only
    before numpy is imported (the pool's size is read then), and never over a value the user set."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _started() -> None:
    """Nothing: submitted first, so the pool forks its process (and runs :func:`_start_detection`) at once."""


def _detect_block(number: int, block: list[ObservationFields]) -> _Found:
    detector, seen, expected = _DETECTION
    if number != expected:
        raise RuntimeError(f"detection block {number} arrived before block {expected}: order would change alerts")
    _DETECTION[2] = expected + 1
    # Each day number as one object across the state, as in the reader (see intern_day): Observation.all_from.
    return _observe_all(detector, seen, Observation.all_from(block))


class _DetectionProcess:
    """The detector core in a forked process: numbered blocks in, in order; their alerts and counts out.

    At most ``_IN_FLIGHT`` blocks wait for it, so a reader faster than the detector does not hold a whole
    file of observations.
    """

    def __init__(self, config: DetectionConfig | None, progress: Callable[[int], None] | None = None) -> None:
        self.progress = progress
        self.pool = ProcessPoolExecutor(
            1, mp_context=get_context("fork"), initializer=_start_detection, initargs=(config,)
        )
        self.pool.submit(_started)  # the pool forks on its first task: now, not when the first block is ready
        self.waiting: deque[Future[_Found]] = deque()
        self.done: list[_Found] = []
        self.sent = 0

    def send(self, block: list[ObservationFields], lines: int = 0) -> None:
        """Queue ``block`` for detection; ``lines`` (input lines it stands for) reach ``progress`` once it is
        detected (from the pool's thread: a rich progress bar takes advances from any thread)."""
        if len(self.waiting) >= _IN_FLIGHT:
            self.done.append(self.waiting.popleft().result())
        future = self.pool.submit(_detect_block, self.sent, block)
        if self.progress is not None and lines:
            future.add_done_callback(_advance_when_detected(self.progress, lines))
        self.waiting.append(future)
        self.sent += 1

    def results(self) -> Iterator[_Found]:
        yield from self.done
        while self.waiting:
            yield self.waiting.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


_IN_FLIGHT = 4


def _advance_when_detected(progress: Callable[[int], None], lines: int) -> Callable[[Future[_Found]], None]:
    """A done-callback that advances ``progress`` by ``lines`` if the block was detected; not for a block
    that failed, nor for one cancelled at a shutdown (Ctrl-C, an error), whose ``exception()`` would raise."""

    def advance(done: Future[_Found]) -> None:
        if not done.cancelled() and done.exception() is None:
            progress(lines)

    return advance


def _fork_is_safe() -> bool:
    """Fork only where the helper does (Linux, no embedded ClickHouse engine whose threads a fork would copy)."""
    return "chdb" not in sys.modules and sys.platform == "linux"


# --- RDKit ahead of the reader -----------------------------------------------------------------------
#
# Standardising a new SMILES spelling costs ~0.3 ms, a tenth of the backtest when cold. A second process
# standardises the spellings of the next block while this one detects over the current block; its
# answers are the same function's (``structure_from_smiles``), so results do not depend on it.

_BLOCK_LINES = 4096
_FIRST_BLOCK_LINES = 1024  # the first block read and detected: the helper standardises it before the rest


def _first_block_lines() -> int:
    return min(_FIRST_BLOCK_LINES, _BLOCK_LINES)


_SMILES_FIELD = re.compile(r'"smiles"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _spellings(block: list[tuple[str, str]], asked: set[str]) -> list[str]:
    """SMILES spellings in ``block`` not asked for yet, as validation will hand them to the resolver."""
    new = set()
    for _source, line in block:
        if not isinstance(line, str):  # callers may hand over raw bytes: those resolve when read
            continue
        for raw in _SMILES_FIELD.findall(line):
            try:
                text = json.loads(f'"{raw}"') if "\\" in raw else raw
            except ValueError:
                continue
            text = text.strip()
            if text and text not in asked:
                new.add(text)
    asked.update(new)
    return sorted(new)


#: How much nicer the structure helper is than the reader and the detection process (see _behind_the_others).
HELPER_NICENESS = 10


def _behind_the_others() -> None:
    """The helper runs when a core would otherwise idle. Why: on 2 cores the reader, the detection process and
    this helper compete, and the detection process, the larger and order-bound half, bounds the year's wall time;
    shared fairly three ways it lost a third of its core whenever the helper had work. Nicer, the helper takes
    the reader's core while the reader waits for its answers (the reader needs them before it resolves the next
    block) and any core the other two leave idle, so the reader and the helper share one core and the detection
    process keeps the other. The answers are the same function's: nothing but the schedule changes.

    A refusal (a seccomp or sandbox policy denying setpriority: EPERM) leaves the helper at the reader's niceness:
    raised here, in the pool's initializer, it would break the pool and fail the whole backtest over a preference."""
    if hasattr(os, "nice"):  # POSIX; raising one's own niceness needs no privilege, but a policy may refuse it
        with contextlib.suppress(OSError):  # only the schedule: the same answers at the reader's niceness
            os.nice(HELPER_NICENESS)


def _standardise_all(spellings: list[str]) -> dict[str, Structure | str]:
    return {text: structure_from_smiles(text) for text in spellings}


def _with_structures_ahead(
    lines: Iterable[tuple[str, str]],
) -> tuple[Generator[tuple[str, str], None, None], bool]:
    """The lines unchanged, and whether they are more than one block; meanwhile a helper process fills the
    structure cache a block ahead.

    Reads the first block and hands it to the helper at once (not at the first ``next``), so the caller can
    build its resolver (the catalogue's structures) while the helper standardises that block. Small inputs
    (one block) never start the process.
    """
    source = iter(lines)
    blocks = iter(lambda: list(itertools.islice(source, _BLOCK_LINES)), [])
    first = next(blocks, None)
    if first is None or len(first) < _BLOCK_LINES:
        return _plain(first or []), False
    method = "fork" if _fork_is_safe() else "forkserver"
    asked: set[str] = set()
    pool = ProcessPoolExecutor(1, mp_context=get_context(method), initializer=_behind_the_others)
    try:
        # The first block in two parts: the reader (and so the detector) starts once the helper has the first.
        head, rest = first[: _first_block_lines()], first[_first_block_lines() :]
        started = [(part, pool.submit(_standardise_all, _spellings(part, asked))) for part in (head, rest)]
    except BaseException:
        pool.shutdown()
        raise
    ahead = _blocks_ahead(pool, blocks, started, asked)
    next(ahead)  # into its ``with pool``: closing the generator from now on shuts the helper down
    return ahead, True


def _plain(block: list[tuple[str, str]]) -> Generator[tuple[str, str], None, None]:
    yield from block


def _blocks_ahead(
    pool: ProcessPoolExecutor,
    blocks: Iterator[list[tuple[str, str]]],
    started: list[tuple[list[tuple[str, str]], Future[dict[str, Structure | str]]]],
    asked: set[str],
) -> Generator[Any, None, None]:
    """Yield each block once the helper's answers for it are in this process's cache; submit the next first.

    ``started``: the first blocks, already submitted. The first item yielded is None: it only starts the
    generator (see :func:`_with_structures_ahead`).
    """
    with pool:
        yield None
        ahead: deque[tuple[list[tuple[str, str]], Future[dict[str, Structure | str]]]] = deque(started)
        while ahead:
            block, future = ahead.popleft()
            following = next(blocks, None)
            if following is not None:
                ahead.append((following, pool.submit(_standardise_all, _spellings(following, asked))))
            remember_structures(future.result())
            yield from block


def read_lines(path: Path) -> Iterator[tuple[str, str]]:
    name = path.name  # a property that splits the path: once, not per line
    with open(path, encoding="utf-8", errors="surrogateescape") as stream:
        for number, line in enumerate(stream, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield f"{name}:{number}", text


def run_file(
    input_path: Path,
    output_path: Path,
    config: DetectionConfig | None = None,
    rejects_path: Path | None = None,
    progress: Callable[[int], None] | None = None,
    received_at: datetime | None = None,
    max_future_hours: float | None = None,
) -> BacktestRun:
    """Backtest a file; writes one alert per line to ``output_path`` and rejects beside it.

    ``progress`` (a progress bar's advance) hears how many non-blank lines are done, a block at a time.
    ``received_at``: when the file's reports were received (see :func:`run_lines`); ``max_future_hours``: how far
    after it an event time may lie (the worker's ``SYNTHWATCH_MAX_FUTURE_HOURS``; None: its default, 24).
    """
    intake = None
    if max_future_hours is not None:
        intake = Intake(stage="backtest", limits=RecordLimits(max_future_hours=max_future_hours))
    run = run_lines(read_lines(input_path), config, intake=intake, progress=progress, received_at=received_at)
    output_path.write_text("".join(a.model_dump_json() + "\n" for a in run.alerts), encoding="utf-8")
    rejects_path = rejects_path or output_path.with_name(output_path.name + ".rejects.ndjson")
    rejects_path.write_text("".join(r.model_dump_json() + "\n" for r in run.rejects), encoding="utf-8")
    return run
