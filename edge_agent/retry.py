"""Jittered exponential backoff, for the uplink's reconnects and failed model loads, and the
jittered wait a busy control plane asks for instead (``edgeplane_proto.reconnect``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edgeplane_proto import reconnect


class Jitter(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Delay before the next attempt after ``failures`` consecutive failed ones."""

    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0

    def delay(self, failures: int, rng: Jitter) -> float:
        """Between half and all of the capped exponential step (spreads a fleet's retries)."""
        step = min(self.maximum, self.initial * self.factor ** min(max(failures - 1, 0), 32))
        return step * rng.uniform(0.5, 1.0)


MODEL_RETRY = RetryPolicy()  # a failed download or load: 1 s doubling to 60 s
# the uplink to the control plane: a restarted one keeps a site for the cap (edgeplane_proto.reconnect)
RECONNECT = RetryPolicy(initial=reconnect.RECONNECT_INITIAL_S, maximum=reconnect.RECONNECT_MAX_S)


def pushback_delay(asked: float, rng: Jitter) -> float:
    """The wait before joining a control plane that asked for ``asked`` seconds: never less,
    up to ``PUSHBACK_JITTER`` times as long (agents told alike do not come back together),
    within the reconnect cap whatever it asked."""
    return min(asked * rng.uniform(1.0, reconnect.PUSHBACK_JITTER), reconnect.RECONNECT_MAX_S)
