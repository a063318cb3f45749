"""How the gateway counts a request moving on from a replica that failed it.

Every route tries one caller request at replica after replica until one answers: the
plain v2 and OpenAI routes among one model's replicas, a cascade across its stages too,
and a streaming cascade hands its last stage to the OpenAI relay. Each counts in
``edgeplane_gateway_failovers_total`` the site of an attempt that failed once another
replica is tried (the last replica tried counts none: the request moved on from nothing),
so one :class:`Failovers` per caller request goes with it through all of them.
"""

from __future__ import annotations

from prometheus_client import Counter


class Failovers:
    """One caller request's failovers, counted in ``counter`` (``edgeplane_gateway_failovers``,
    by ``model`` and the site moved on from); None counts nothing."""

    def __init__(self, counter: Counter | None, model: str) -> None:
        self.counter, self.model = counter, model
        self._failed_at: str | None = None  # the site of the attempt under way or just failed, until it answers

    def attempt(self, site: str) -> None:
        """The replica at ``site`` is about to run the request: if the attempt before it
        failed, the request moves on from that one. Until it :meth:`answered`, it counts as failed."""
        if self._failed_at is not None and self.counter is not None:
            self.counter.labels(self.model, self._failed_at).inc()
        self._failed_at = site

    def answered(self) -> None:
        """The replica of the last :meth:`attempt` answered: no failover from it."""
        self._failed_at = None
