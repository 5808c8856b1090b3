"""The ``synthwatch`` command: one module per command group, wired in :mod:`synthwatch.cli.main`."""
