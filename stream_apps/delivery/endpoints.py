"""One receiving server at a time: a concurrency limit and a circuit breaker per endpoint.

An endpoint is a webhook origin (scheme, host, port) or the SMTP server. A hung receiver may hold at
most ``concurrency`` attempts; everyone else's deliveries go to other endpoints and never queue behind
it. After ``failures_to_open`` consecutive failures (timeouts, refused connections, 5xx) the circuit
opens: deliveries to the endpoint wait (deferred, not dropped; the service records it) instead of
each spending its own timeout. After ``cooldown_s`` one probe goes out (half-open); its success closes
the circuit and the waiting deliveries proceed, its failure opens it again for twice as long (capped).

A delivery holds an endpoint slot only for one attempt, never while it waits to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    """Per endpoint: attempts in flight, consecutive failures that open the circuit, and its cool-down."""

    concurrency: int = 4
    failures_to_open: int = 5
    cooldown_s: float = 30.0
    max_cooldown_s: float = 600.0


class Endpoint:
    """The limit and breaker of one receiving server; use :meth:`turn` and :meth:`done` around an attempt."""

    def __init__(self, name: str, limits: EndpointLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limits = limits
        self.clock = clock
        self.state: State = "closed"
        self.failures = 0  # consecutive
        self.cooldown_s = limits.cooldown_s
        self.reopen_at = 0.0
        self.in_flight = 0
        self.waiting = 0  # deliveries told that the circuit is open, still waiting for it
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._changed = asyncio.Condition()
        self._probing = False
        self._version = 0  # bumped on every change, so a waiter cannot miss one

    def describe(self) -> str:
        """Why deliveries wait, for the ``deferred`` row."""
        left = max(0.0, self.reopen_at - self.clock())
        return (
            f"endpoint {self.name} is failing ({self.failures} consecutive failures): circuit open, "
            f"delivery deferred; next probe in {left:.1f} s"
        )

    async def turn(self, on_deferred: Callable[[str], Awaitable[None]] | None = None) -> bool:
        """Wait until an attempt may go to this endpoint and take a slot; True if it is the half-open probe.

        ``on_deferred`` is awaited once, the first time this call finds the circuit open.
        """
        told = False
        try:
            while True:
                if self.state == "closed":
                    await self._slots.acquire()
                    if self.state == "closed":
                        self.in_flight += 1
                        return False
                    self._slots.release()  # opened while we waited for the slot
                    continue
                if self.state == "open" and self.clock() >= self.reopen_at and not self._probing:
                    self.state, self._probing = "half_open", True
                    await self._slots.acquire()
                    self.in_flight += 1
                    return True
                if not told and on_deferred is not None:
                    told = True
                    self.waiting += 1
                    await on_deferred(self.describe())
                    continue  # the state may have changed while the deferral was recorded
                wait = max(0.0, self.reopen_at - self.clock()) if self.state == "open" else None
                version = self._version
                async with self._changed:
                    if version == self._version:  # nothing changed while we took the lock: sleep until it does
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), wait)
        finally:
            if told:
                self.waiting -= 1

    async def probe_now(self) -> None:
        """End the cool-down: the next waiting delivery probes at once (an operator knows it is back up)."""
        if self.state == "open":
            self.reopen_at = self.clock()
            await self._notify()

    async def done(self, *, reached: bool, probe: bool) -> None:
        """Release the slot; ``reached``: the endpoint answered (any status but a 5xx/408/429) or accepted."""
        self.in_flight -= 1
        self._slots.release()
        if reached:
            self.failures = 0
            if self.state != "closed":
                self.state, self.cooldown_s = "closed", self.limits.cooldown_s
        else:
            self.failures += 1
            if probe or (self.state == "closed" and self.failures >= self.limits.failures_to_open):
                if probe:
                    self.cooldown_s = min(self.limits.max_cooldown_s, self.cooldown_s * 2)
                self.state, self.reopen_at = "open", self.clock() + self.cooldown_s
        if probe:
            self._probing = False
        await self._notify()

    async def _notify(self) -> None:
        self._version += 1
        async with self._changed:
            self._changed.notify_all()


class Endpoints:
    """Endpoint objects by name, made on first use with the same limits."""

    def __init__(self, limits: EndpointLimits | None = None) -> None:
        self.limits = limits or EndpointLimits()
        self._known: dict[str, Endpoint] = {}

    def __getitem__(self, name: str) -> Endpoint:
        endpoint = self._known.get(name)
        if endpoint is None:
            endpoint = self._known[name] = Endpoint(name, self.limits)
        return endpoint

    def states(self) -> dict[str, State]:
        return {name: e.state for name, e in self._known.items()}
