"""The clustered schema (``deploy/clickhouse/clustered``): the same migrations for a sharded, replicated cluster.

Why a separate folder and not package data: a cluster is deployed from a checkout by an operator, and
the files are ON CLUSTER DDL that an embedded engine cannot run; shipping them in the wheel would
only invite applying them to the wrong place. Version numbers mirror the single-node files one to one.
"""

from __future__ import annotations

import re
from pathlib import Path

from clickhouse_connect.driver.client import Client

import synthwatch
from synthwatch.stream_apps.storage.clickhouse import Migration, MigrationError

#: Beside the ``synthwatch`` package's folder: the checkout's root, or site-packages in the image (the
#: Dockerfile copies the folder there). Found from the package root, not this file, because setuptools'
#: package-dir puts this module at different depths in a checkout and in an installed wheel.
CLUSTERED_DIR = Path(synthwatch.__file__).resolve().parent.parent / "deploy" / "clickhouse" / "clustered"
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def clustered_dir(directory: Path | None = None) -> Path:
    """The folder of clustered migrations; a clear error when running from an installed wheel."""
    folder = directory or CLUSTERED_DIR
    if not folder.is_dir():
        raise MigrationError(
            f"the clustered schema is not at {folder}: it ships with the source tree "
            "(deploy/clickhouse/clustered), not with the installed package; run from a checkout of synthwatch"
        )
    return folder


def clustered_migrations(directory: Path | None = None) -> list[Migration]:
    """Every numbered SQL file of the clustered variant, in version order (same shape as the single-node ones)."""
    found = []
    for entry in sorted(clustered_dir(directory).iterdir()):
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if not found:
        raise MigrationError(f"no numbered .sql files in {directory or CLUSTERED_DIR}")
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two clustered migration files share a version number: {versions}")
    return found


def create_database_on_cluster(client: Client, database: str, cluster: str = "{cluster}") -> None:
    """``CREATE DATABASE ... ON CLUSTER``: the Distributed tables need the database on every node first."""
    if not _IDENTIFIER.match(database):
        raise ValueError(f"database name {database!r} must be a plain identifier")
    client.command(f"CREATE DATABASE IF NOT EXISTS {database} ON CLUSTER '{cluster}'")
