"""What ``synthwatch publish`` reports when a run ends: its exit code, the reasons of its rejects, its metrics.

Exit codes (README, ``synthwatch publish --help``): 0 every record was sent; 1 some records were
rejected (the others were sent); 2 nothing was sent (an empty file, every record refused) or an error
(no broker, records not acknowledged by Kafka, a file that cannot be read). A script or a LIMS job can
tell "fix these lines and re-send them" (1) from "the run did not happen" (2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from rich.console import Console

from synthwatch.redaction import redact
from synthwatch.settings import Settings
from synthwatch.terminal import say

if TYPE_CHECKING:
    from synthwatch.producers.publisher import PublishSummary

EXIT_ALL_SENT = 0
EXIT_SOME_REJECTED = 1
EXIT_NOTHING_SENT_OR_ERROR = 2

EXIT_CODES_HELP = (
    "Exit codes: 0 every record was sent; 1 some records were rejected (the rest were sent); "
    "2 nothing was sent (empty file, every record refused) or an error (no broker, records Kafka did not "
    "acknowledge, unreadable file)."
)

#: Reasons listed in a summary at most (the rest are counted, and `synthwatch rejects` lists them all).
MAX_REASONS_SHOWN = 20


def exit_code(summary: PublishSummary) -> int:
    """The documented exit code of a finished run (see the module docstring)."""
    if summary.failed or summary.sent == 0:
        return EXIT_NOTHING_SENT_OR_ERROR
    if summary.rejected or summary.reject_counts:
        return EXIT_SOME_REJECTED
    return EXIT_ALL_SENT


def _line(source: str) -> str:
    """``file.csv:12`` -> ``12`` (the file is named once in the summary's title)."""
    head, _, tail = source.rpartition(":")
    return tail if head and tail.isdigit() else source


def print_reasons(console: Console, summary: PublishSummary) -> None:
    """Each distinct reason with its count and the line numbers that had it, most frequent first."""
    ranked = sorted(summary.reject_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    for reason, count in ranked[:MAX_REASONS_SHOWN]:
        sources = summary.reject_sources.get(reason, [])
        lines = ", ".join(_line(s) for s in sources)
        more = f" and {count - len(sources):,} more" if count > len(sources) else ""
        noun = "line" if count == 1 else "lines"
        say(console, f"  rejected {count:,}× ", reason, style="")
        say(console, f"    {noun} ", lines + more)
    if len(ranked) > MAX_REASONS_SHOWN:
        rest = sum(count for _, count in ranked[MAX_REASONS_SHOWN:])
        say(
            console,
            f"  ... {len(ranked) - MAX_REASONS_SHOWN:,} more reasons ({rest:,} records): "
            "`synthwatch rejects` lists them all",
        )


def push_metrics(
    settings: Settings, summary: PublishSummary, seconds: float, per_topic: Mapping[str, int] | None, err: Console
) -> None:
    """Push this run's counts to ``SYNTHWATCH_PUSHGATEWAY_URL`` (nothing when unset); a failed push is a warning:
    the records were published whatever happens to their monitoring."""
    url = settings.pushgateway_url
    if not url:
        return
    from synthwatch.producers.metrics import PublisherMetrics

    metrics = PublisherMetrics()
    metrics.observe(summary, seconds, per_topic)
    try:
        metrics.push(url)
    except OSError as error:
        say(err, "[yellow]warning:[/] ", redact(f"could not push metrics to {url}: {error}"))
