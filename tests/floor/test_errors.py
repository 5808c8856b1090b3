"""Every exception class synthwatch defines derives from :class:`synthwatch.errors.SynthwatchError` (while keeping
the built-in base it had, so existing ``except ValueError`` / ``except RuntimeError`` clauses still catch it)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from synthwatch.errors import SynthwatchError

#: The importable packages (pyproject.toml's package-dir maps each folder to one of these names).
PACKAGES = (
    "synthwatch",
    "synthwatch.schemas",
    "synthwatch.producers",
    "synthwatch.stream_apps",
    "synthwatch.dashboards",
    "synthwatch.migrations",
)


def _modules() -> list[str]:
    """Every module of the installed package; ``synthwatch``'s own path does not reach the mapped folders."""
    names = set(PACKAGES)
    for package in PACKAGES:
        names |= {
            found.name for found in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
        }
    return sorted(names)


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        found += [
            value
            for value in vars(module).values()
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__
        ]
    return found


def test_every_exception_derives_from_synthwatch_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 20, "the walk found the package's exceptions (QueryError, WireError, ...)"
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, SynthwatchError)]
    assert not outside, "derive these from synthwatch.errors.SynthwatchError (keeping their base):\n" + "\n".join(
        outside
    )


def test_the_built_in_bases_still_catch_them() -> None:
    """A sample from each layer: the new base comes first, the old one is still there."""
    from synthwatch.kafka_clients import KafkaConnectError
    from synthwatch.schemas.wire import WireError
    from synthwatch.stream_apps.delivery.webhook import TargetRefused
    from synthwatch.stream_apps.storage.query import QueryError

    assert issubclass(WireError, ValueError) and issubclass(QueryError, RuntimeError)
    assert issubclass(KafkaConnectError, RuntimeError)
    refused = TargetRefused("10.0.0.1 is a private address")
    assert isinstance(refused, OSError) and str(refused) == "10.0.0.1 is a private address"
