"""A worker with a defect injected into an agent, for tests/integration/test_agent_failures.py.

``python -m tests.support.agent_faults EVENT_ID worker ...``: runs ``synthwatch worker ...`` whose region
stage (inside the ``intake`` agent) raises once, on the event with that id. A defect, not an input: the same
event goes through a worker without this module, as after the orchestrator restarted the failed one.
"""

from __future__ import annotations

import sys
from typing import Any

from synthwatch.stream_apps.detect.region import Observation, RegionDetector


def inject(event_id: str) -> None:
    """Make :meth:`RegionDetector.observe` raise once in this process, on ``event_id``."""
    original = RegionDetector.observe
    raised: list[str] = []

    def observe(self: RegionDetector, obs: Observation, *args: Any, **kwargs: Any) -> Any:
        if obs.event_id == event_id and not raised:
            raised.append(event_id)
            raise RuntimeError(f"injected defect in the region stage on {event_id}")
        return original(self, obs, *args, **kwargs)

    RegionDetector.observe = observe  # type: ignore[method-assign]


def main() -> None:
    inject(sys.argv[1])
    sys.argv = ["synthwatch", *sys.argv[2:]]
    from synthwatch.cli.main import main as cli

    cli()


if __name__ == "__main__":
    main()
