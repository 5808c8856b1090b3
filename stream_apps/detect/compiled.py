"""The detection core compiled with mypyc, loaded only when it was built from the sources beside it.

Why: the detector core is ~37 µs of interpreted Python per event spread over a dozen functions (no hot spot
to rewrite); compiled as a whole by mypyc it takes about half the CPU (docs/performance.md, "Fourth step"),
with the same alerts, byte for byte (Python's own ``sum`` and float arithmetic, in the same order).

How it stays safe with an editable install:

- ``make install`` runs :func:`build` (``make core``, when a source changed): mypyc compiles
  :data:`MODULES` from a copy of their sources into ``build/core/`` of the checkout, never beside the sources
  (an ``.so`` there would shadow the ``.py`` and, once stale, run old code silently). ``manifest.json``, written
  last, holds the sha256 of each source it compiled.
- :func:`install` (run when this package is imported) loads the compiled modules only if every one of their
  sources still has the hash the build recorded, for this interpreter's extension suffix. Any difference:
  all of them stay pure Python (the compiled ones call each other directly, so half a build would run old
  code) and one line on stderr says to run ``make install``. No build at all (an install from a wheel or
  the image): pure Python, silently.
- ``SYNTHWATCH_COMPILED_CORE=0`` keeps the pure modules (how the tests run the pure path beside the compiled
  one; see :attr:`synthwatch.settings.Settings.compiled_core`).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACKAGE = "synthwatch.stream_apps.detect"

#: The modules compiled, in the package: the spike model, the region and novelty stages, replay marks, alerts.
MODULES = ("alerting", "replay", "spikes", "novelty", "region")

#: The package's sources and the checkout they are in (``stream_apps/detect`` -> the checkout's root).
SOURCES = Path(__file__).resolve().parent
CHECKOUT = SOURCES.parents[1]
BUILD = CHECKOUT / "build" / "core"

ENVIRONMENT = "SYNTHWATCH_COMPILED_CORE"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _suffix() -> str:
    """The file suffix of an extension module built for this interpreter (e.g. ``.cpython-311-x86_64-linux-gnu.so``)."""
    return importlib.machinery.EXTENSION_SUFFIXES[0]


@dataclass(frozen=True)
class Verdict:
    """Whether the build in ``build`` may be loaded, and if not, why (None: nothing built, say nothing)."""

    usable: bool
    reason: str | None = None
    shared: Path | None = None  # mypyc's library of the group (the modules' code); each module's .so is a shim


def check(build: Path = BUILD, sources: Path = SOURCES, modules: Sequence[str] = MODULES) -> Verdict:
    """Can the compiled modules in ``build`` stand in for the sources in ``sources``?"""
    manifest_path = build / "manifest.json"
    if not manifest_path.is_file():
        return Verdict(False)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        built: dict[str, str] = manifest["modules"]
        suffix, shared_name = manifest["suffix"], manifest["shared"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return Verdict(False, f"its manifest is unreadable ({error})")
    if suffix != _suffix():
        return Verdict(False, f"it was built for another interpreter ({suffix}, this one loads {_suffix()})")
    if sorted(built) != sorted(modules):
        return Verdict(False, f"it holds other modules ({', '.join(sorted(built))})")
    changed = [name for name in modules if _digest(sources / f"{name}.py") != built[name]]
    if changed:
        return Verdict(False, f"{', '.join(f'{name}.py' for name in changed)} changed since it was built")
    missing = [name for name in modules if not _module_file(build, name).is_file()]
    shared = build / "src" / str(shared_name)
    if missing or not shared.is_file():
        return Verdict(False, f"its files are missing ({', '.join(missing) or shared.name})")
    return Verdict(True, shared=shared)


def _module_file(build: Path, name: str) -> Path:
    return build / "src" / Path(*PACKAGE.split(".")) / f"{name}{_suffix()}"


class _CompiledFinder:
    """Finds the compiled modules of the verified build (and nothing else: every other import goes on as usual)."""

    def __init__(self, build: Path) -> None:
        self.files = {f"{PACKAGE}.{name}": _module_file(build, name) for name in MODULES}

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file)


def enabled() -> bool:
    """False when ``SYNTHWATCH_COMPILED_CORE`` is 0/false/no/off (read from the environment: this runs on import,
    before any settings object exists)."""
    return os.environ.get(ENVIRONMENT, "1").strip().lower() not in {"0", "false", "no", "off"}


def install(build: Path = BUILD) -> bool:
    """Load the compiled core for the detection modules if the build matches their sources; True if it will be used."""
    if not enabled():
        return False
    verdict = check(build)
    if not verdict.usable:
        if verdict.reason is not None:
            sys.stderr.write(
                f"synthwatch: the compiled detection core in {build} is not used: {verdict.reason}; running pure "
                "Python (slower). `make install` rebuilds it.\n"
            )
        return False
    if any(f"{PACKAGE}.{name}" in sys.modules for name in MODULES):
        return False  # imported already (pure): a second copy of a module would split its state
    assert verdict.shared is not None
    # mypyc's group library: the modules' shims import it by its top-level name, so it is loaded first, from here.
    name = verdict.shared.name.split(".", 1)[0]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, verdict.shared)
        if spec is None or spec.loader is None:
            return False
        library: ModuleType = importlib.util.module_from_spec(spec)
        sys.modules[name] = library
        spec.loader.exec_module(library)
    sys.meta_path.insert(0, _CompiledFinder(build))
    return True


def in_use() -> bool:
    """Whether the imported detection modules are the compiled ones (all of them)."""
    modules = [sys.modules.get(f"{PACKAGE}.{name}") for name in MODULES]
    return all(m is not None and str(m.__file__).endswith(_suffix()) for m in modules)


# --- the build (make install) ----------------------------------------------------------------------------

#: The checkout's packages as they are installed (pyproject.toml's package-dir), for mypy to follow imports.
_LAYOUT = {
    "schemas": "schemas",
    "producers": "producers",
    "migrations": "deploy/clickhouse/migrations",
    "dashboards": "dashboards",
}


def _tree(src: Path) -> dict[str, str]:
    """The installed layout under ``src`` (symlinks), the compiled modules copied; their sha256 by name."""
    package = src / "synthwatch"
    package.mkdir(parents=True)
    for entry in (CHECKOUT / "synthwatch").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, where in _LAYOUT.items():
        (package / name).symlink_to(CHECKOUT / where)
    stream_apps = package / "stream_apps"
    stream_apps.mkdir()
    for entry in (CHECKOUT / "stream_apps").iterdir():
        if entry.name not in {"detect", "__pycache__"}:
            (stream_apps / entry.name).symlink_to(entry)
    detect = stream_apps / "detect"
    detect.mkdir()
    digests = {}
    for entry in SOURCES.iterdir():
        if entry.suffix != ".py":
            continue
        if entry.stem in MODULES:
            data = entry.read_bytes()  # the bytes compiled are the bytes hashed
            (detect / entry.name).write_bytes(data)
            digests[entry.stem] = hashlib.sha256(data).hexdigest()
        else:
            (detect / entry.name).symlink_to(entry)
    return digests


def build(build_dir: Path = BUILD) -> Path:
    """Compile :data:`MODULES` with mypyc into ``build_dir`` (replaced whole, once the new one is complete)."""
    work = build_dir.with_name(build_dir.name + ".new")
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    digests = _tree(src)
    files = [str(Path(*PACKAGE.split(".")) / f"{name}.py") for name in MODULES]
    command = [sys.executable, "-m", "mypyc", "--config-file", str(CHECKOUT / "pyproject.toml"), *files]
    done = subprocess.run(command, cwd=src, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mypyc failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    shared = [p.name for p in src.glob(f"*__mypyc{_suffix()}")]
    if len(shared) != 1:
        raise RuntimeError(f"mypyc left {len(shared)} group libraries in {src}, expected one")
    missing = [name for name in MODULES if not _module_file(work, name).is_file()]
    if missing:
        raise RuntimeError(f"mypyc built no extension for {', '.join(missing)}")
    shutil.rmtree(src / "build", ignore_errors=True)  # the C sources and objects
    manifest = {"modules": digests, "suffix": _suffix(), "shared": shared[0], "python": sys.version}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    old = build_dir.with_name(build_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if build_dir.exists():
        build_dir.rename(old)  # a running process keeps the files it mapped; a new one sees no build, or the new one
    work.rename(build_dir)
    shutil.rmtree(old, ignore_errors=True)
    return build_dir
