"""The RDKit pre-pass: each distinct SMILES in the file through RDKit once, split over the worker processes.

Why: RDKit costs ~1 ms per distinct SMILES; done up front in the workers, while the loader opens and
migrates the engine, the chunks then find every structure computed.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from synthwatch.stream_apps.detect.identity import Structure, structure_from_smiles
from synthwatch.stream_apps.storage.backfill.parse import worker_parser

# The JSON string after "smiles": runs of plain characters between escapes (unrolled: 3x faster than an
# alternation per character, same matches).
_SMILES_FIELD = re.compile(rb'"smiles"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


def compute_structures(smiles: list[str]) -> dict[str, Structure | str]:
    """RDKit's answer for each SMILES (a structure, or the reason it is not one); runs in a worker."""
    return {text: structure_from_smiles(text) for text in smiles}


def compute_in_pool(
    pool: ProcessPoolExecutor | None, workers: int, smiles: list[str]
) -> list[Future[dict[str, Structure | str]]]:
    """RDKit's answers for ``smiles``, split over the pool's processes and started now ([] without a pool or
    SMILES: the resolver then computes what it meets itself, with the same result)."""
    if pool is None or not smiles:
        return []
    parts = [smiles[i :: max(workers, 1)] for i in range(max(workers, 1))]
    return [pool.submit(compute_structures, part) for part in parts if part]


def scan_part(path: str, start: int, end: int, warm: bool = True) -> set[str]:
    """Distinct SMILES spellings in a byte range of whole lines; also readies this worker's caches.

    Runs in the workers while the parent opens and migrates the engine, so the first chunks find the
    catalogue indexed and pint's registry built (a few hundred ms per process otherwise). ``warm=False``
    (the engine's path, whose workers never resolve a substance) leaves the caches cold: ~0.1 CPU s a process.
    """
    if warm:
        worker_parser().warm()
    found: set[str] = set()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining > 0:
            block = handle.read(min(remaining, 64 * 1024 * 1024))
            if not block:
                break
            remaining -= len(block)
            found.update(_decoded_smiles(_SMILES_FIELD.findall(block)))
    return found


def _decoded_smiles(found: Iterable[bytes]) -> set[str]:
    out = set()
    for raw in set(found):
        try:
            text = json.loads(b'"' + raw + b'"')
        except ValueError:
            continue
        if isinstance(text, str) and text.strip():
            out.add(text.strip())
    return out


class Prepass:
    """Every distinct SMILES through RDKit once, split over the workers, started before the engine opens.

    A thread chains the two steps (scan, then RDKit), so the structures are computed while this process
    opens the engine and migrates, not after.
    """

    def __init__(
        self, pool: ProcessPoolExecutor, path: Path, workers: int, head: int | None = None, warm: bool = True
    ) -> None:
        """``head``: scan only the file's first ``head`` bytes, to the end of the line under way there
        (default: the whole file). ``warm``: ready the workers' parsing caches too (:func:`scan_part`)."""
        self.pool, self.workers = pool, workers
        size = path.stat().st_size
        bounds = [0]
        with open(path, "rb") as handle:
            if head is not None and head < size:
                handle.seek(head)
                handle.readline()  # to the end of the line under way
                size = handle.tell()
            for i in range(1, workers):
                handle.seek(max(size * i // workers, bounds[-1]))
                handle.readline()  # to the next line start: a line is scanned by exactly one part
                bounds.append(handle.tell())
        bounds.append(size)
        self.scans = [pool.submit(scan_part, str(path), a, b, warm) for a, b in itertools.pairwise(bounds)]
        self._found: Future[dict[str, Structure | str]] = Future()
        threading.Thread(target=self._compute, name="ingest-prepass", daemon=True).start()

    def _compute(self) -> None:
        try:
            spellings = sorted(set().union(*(scan.result() for scan in self.scans)))
            parts = [spellings[i :: self.workers] for i in range(self.workers)]
            structures: dict[str, Structure | str] = {}
            for part in self.pool.map(compute_structures, parts):
                structures.update(part)
        except BaseException as error:  # handed to the caller of structures()
            self._found.set_exception(error)
        else:
            self._found.set_result(structures)

    def structures(self) -> dict[str, Structure | str]:
        return self._found.result()
