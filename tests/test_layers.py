"""The import rule of ARCHITECTURE.md, enforced: every module imports only its own layer or the layers below,
and no two modules import each other (directly or round a longer loop).

Why a test: layers a newcomer can see are only worth something while they hold. A change that makes the
detection core import ClickHouse code, or the floor import the CLI, fails here with the offending line.
Imports inside functions count too: a lazy import is still a dependency (it only hides a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Where each importable package lives in the checkout (pyproject.toml's package-dir).
PACKAGE_DIRS = {
    "synthwatch": ROOT / "synthwatch",
    "synthwatch.schemas": ROOT / "schemas",
    "synthwatch.producers": ROOT / "producers",
    "synthwatch.stream_apps": ROOT / "stream_apps",
    "synthwatch.dashboards": ROOT / "dashboards",
    "synthwatch.migrations": ROOT / "deploy" / "clickhouse" / "migrations",
}

#: The floor: settings, the catalogue, message schemas, and the small helpers every layer prints or
#: connects through. Nothing here imports anything above it.
FLOOR = (
    "synthwatch",  # the package's __init__
    "synthwatch.settings",
    "synthwatch.catalogue",
    "synthwatch.errors",
    "synthwatch.redaction",
    "synthwatch.terminal",
    "synthwatch.consoles",
    "synthwatch.kafka_clients",
    "synthwatch.stackfile",
    "synthwatch.schemas",
    "synthwatch.migrations",
)

#: Layers from the bottom up. A module may import its own layer and any layer listed before it, except
#: where ``MAY_NOT`` says otherwise.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("floor", FLOOR),
    ("detect", ("synthwatch.stream_apps.detect",)),
    ("producers", ("synthwatch.producers",)),
    ("storage", ("synthwatch.stream_apps.storage",)),
    ("dashboards", ("synthwatch.dashboards",)),
    ("delivery", ("synthwatch.stream_apps.delivery",)),
    ("runtime", ("synthwatch.stream_apps.runtime",)),
    ("wiring", ("synthwatch.stream_apps",)),  # stream_apps/app.py: wires the runtime together
    ("stack", ("synthwatch.stack",)),
    ("bench", ("synthwatch.bench",)),
    ("cli", ("synthwatch.cli",)),
]

#: Layers that sit beside each other rather than on top: producers (labs' and customs' side) never see
#: ClickHouse or the worker; dashboards never see the worker or the producers; storage does not publish.
MAY_NOT = {
    "storage": {"producers"},
    "dashboards": {"producers"},
    "delivery": {"producers", "dashboards"},
    "runtime": {"dashboards"},
    "wiring": {"dashboards"},
}


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to: the longest matching prefix wins."""
    best, best_len = "", -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    if not best:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and ARCHITECTURE.md")
    return best


RANK = {name: index for index, (name, _) in enumerate(LAYERS)}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a submodule when ``from package import submodule``)
    line: int


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    found: dict[str, Path] = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if any(part in {"__pycache__", "json", "templates"} for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    """The package-internal imports of one module, relative ones resolved."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("synthwatch"):
                    yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("synthwatch"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield Import(module, submodule if submodule in known else target, node.lineno)


def all_imports() -> list[Import]:
    known = modules()
    return [found for module, path in sorted(known.items()) for found in imports_of(module, path, known)]


def test_every_module_is_in_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own() -> None:
    known = modules()
    wrong = []
    for found in all_imports():
        source, target = layer_of(found.source), layer_of(found.target)
        if RANK[target] > RANK[source] or target in MAY_NOT.get(source, set()):
            where = known[found.source].relative_to(ROOT)
            wrong.append(f"{where}:{found.line}: {found.source} ({source}) imports {found.target} ({target})")
    assert not wrong, "imports against the layer rule (ARCHITECTURE.md):\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for found in all_imports():
        if found.target != found.source and not found.source.startswith(found.target + "."):
            graph.setdefault(found.source, set()).add(found.target)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("synthwatch.stream_apps.detect.identity", "detect"),
        ("synthwatch.stream_apps.storage.backfill.ingest", "storage"),
        ("synthwatch.stream_apps.app", "wiring"),
        ("synthwatch.schemas.events", "floor"),
        ("synthwatch.cli.main", "cli"),
    ],
)
def test_layer_of_takes_the_longest_prefix(module: str, layer: str) -> None:
    assert layer_of(module) == layer


def test_every_package_is_in_the_wheel() -> None:
    """pyproject.toml lists packages one by one (package-dir maps folders to names): a new subpackage missing
    from the list works in the editable checkout and is absent from the wheel and the Docker image."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module for module, path in modules().items() if path.name == "__init__.py"}
    assert packages - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
