"""The worker's Faust worker leaves debug logging off at its default level (no spinner forcing DEBUG)."""

from __future__ import annotations

import logging

import faust

from synthwatch.stack.worker import faust_worker


def test_the_worker_at_warning_does_not_switch_the_root_logger_to_debug() -> None:
    app = faust.App("logging-check", broker="kafka://127.0.0.1:9", web_enabled=False)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        worker = faust_worker(app, "warning")
        worker._setup_logging()  # what the worker does when it starts
        assert root.getEffectiveLevel() == logging.WARNING
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
        plain = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
        plain._setup_logging()
        assert root.getEffectiveLevel() == logging.DEBUG, "Faust's spinner no longer forces DEBUG: drop the fix"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
