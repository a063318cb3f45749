"""How the gateway counts a request moving on from a replica that failed it.

Every route tries one caller request at replica after replica until one answers: the
plain v2 and OpenAI routes among one model's replicas, a cascade across its stages too,
and a streaming cascade hands its last stage to the OpenAI relay. Each counts in
``edgeplane_gateway_failovers_total`` the site of an attempt that failed once another
replica is tried (the last replica tried counts none: the request moved on from nothing),
so one :class:`Failovers` per caller request goes with it through all of them. The same
sites, in the order tried, are the answer's ``X-Edgeplane-Failover`` (:func:`header`), which
the access line carries too: an answer from a replica that is not the caller's nearest says
when a failover is why. When nearer replicas were passed over without being tried, the same
answer says why in ``X-Edgeplane-Skipped`` (:mod:`orchestrator.gateway.skips`), which the
route that ranked them lets the request's :class:`Failovers` work out (:meth:`Failovers.explain_by`).

A replica that answers 503 is not down: its model is not ready yet, or its agent drains,
and it says when to retry. When every replica a request (or the cascade stage it ended on)
tried answered so, each route answers 503 with the shortest of their Retry-Afters
(:func:`retry_after`), not 502 "failed", which reads as a fault. A replica that answered 404
has not failed either (the model moved away from it a moment ago, and the table follows):
among 503s it leaves the answer a 503.

A replica's redirect is no answer (:func:`redirect`): an ingress in front of it sending
plain HTTP to HTTPS, or an auth proxy to its login page. The gateway follows none (the
request would leave the replicas it chose) and passes none on (its caller has nothing to
follow), so the request moves on, and the replica is ejected as one that is down
(``EndpointTable.answered``): every request to it would be redirected alike.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Collection, Mapping, Sequence

from prometheus_client import Counter

from edgeplane_proto import retry_after as retry_header
from edgeplane_proto.headers import DRAINING, MAX_RETRY_AFTER_S
from orchestrator.gateway import skips

#: The answer's header naming the sites a request moved on from (:meth:`Failovers.header`).
FAILOVER = "x-edgeplane-failover"

def retry_after_s(value: str | None, now: datetime.datetime | None = None) -> int:
    """A replica's Retry-After in whole seconds, 1 to :data:`MAX_RETRY_AFTER_S`, given in
    seconds or as an HTTP date (measured from ``now``, the current time when None); 1 when
    it gave none, one that cannot be read, or a date past (its clock behind the gateway's)."""
    return _bounded(retry_header.seconds(value, now))


def _bounded(seconds: float | None) -> int:
    return 1 if seconds is None else min(max(math.ceil(seconds), 1), MAX_RETRY_AFTER_S)


def passed_on(value: str | None) -> dict[str, str]:
    """The Retry-After header to give the caller for a replica's (a 429's, a refusal's),
    bounded as :func:`retry_after_s`: a client that honours it (urllib3's ``Retry`` does, with
    no cap) would wait as long as it says, decades for a wrong clock. None given, none."""
    return {} if value is None else {"retry-after": str(retry_after_s(value))}


def ejection_s(answer_headers: Mapping[str, str]) -> int | None:
    """At most how long a replica's 503 takes it out of rotation: the Retry-After it gave,
    in seconds or as a date (:func:`retry_after_s`); None, its whole ejection, when it gave
    none or one that cannot be read, or said it is draining (an agent stopping: asking it
    again each second would only send more requests to a replica that is going away)."""
    if answer_headers.get(DRAINING) is not None or (seconds := retry_header.seconds(answer_headers.get("retry-after"))) is None:
        return None
    return _bounded(seconds)


def retry_after(unavailable: Sequence[int | None], failed: int) -> int | None:
    """When the caller should retry, if each of the ``failed`` replicas tried answered 503
    or 404 (``unavailable``: the :func:`retry_after_s` of each 503, None for each 404: it no
    longer serves the model) and one at least answered 503; None when one failed otherwise."""
    waits = [s for s in unavailable if s is not None]
    return min(waits) if waits and len(unavailable) == failed else None


def redirect(status: int, answer_headers: Mapping[str, str]) -> str | None:
    """Why a replica's answer with ``status`` is a failed attempt when it is a redirect (any
    3xx), naming where to; None for any other status."""
    if not 300 <= status < 400:
        return None
    where = answer_headers.get("location")
    return f"redirected{f' to {where[:200]}' if where else ''} (HTTP {status})"


#: Why replicas nearer the caller than the one at a site (the first argument) were passed
#: over, the sites tried and moved on from (the second) left out: an ``EndpointTable.skipped``
#: bound to the ranking the request's attempts came from.
Explain = Callable[[str, Collection[str]], "skips.Skips | None"]


class Failovers:
    """One caller request's failovers, counted in ``counter`` (``edgeplane_gateway_failovers``,
    by ``model`` and the site moved on from); None counts nothing. Its answer's skips are
    counted in ``skipped`` (``edgeplane_gateway_skipped``, by ``model`` and reason) likewise."""

    def __init__(self, counter: Counter | None, model: str, skipped: Counter | None = None) -> None:
        self.counter, self.model, self.skipped = counter, model, skipped
        self._failed_at: str | None = None  # the site of the attempt under way or just failed, until it answers
        self._at: str | None = None  # the site of the last attempt: the one whose answer is given
        self.moved_from: list[str] = []  # the sites moved on from, in the order tried
        self._explain: Explain | None = None
        self._skips: tuple[str, skips.Skips | None] | None = None  # worked out for a site, once
        self._counted_at: str | None = None  # the site whose answer's skips were counted

    def explain_by(self, explain: Explain) -> None:
        """Say the answer's skips from ``explain``: the ranking of the replicas being tried (a
        cascade's stage each time it runs another)."""
        self._explain, self._skips = explain, None

    def header(self) -> dict[str, str]:
        """The headers for the answer of the attempt under way: ``X-Edgeplane-Failover``, the
        sites this request moved on from before it, comma-separated in the order tried (none
        when it moved on from none), and ``X-Edgeplane-Skipped`` when nearer replicas were
        passed over untried (:mod:`~orchestrator.gateway.skips`), worked out and counted once
        per answer however often asked."""
        out = {FAILOVER: ",".join(self.moved_from)} if self.moved_from else {}
        if self._explain is not None and self._at is not None:
            if self._skips is None or self._skips[0] != self._at:
                found = self._explain(self._at, self.moved_from)
                self._skips = (self._at, found)
                if self._counted_at != self._at:  # a stage's headers asked again after explain_by: one answer still
                    self._counted_at = self._at
                    skips.count(self.skipped, self.model, found)
            out.update(skips.header(self._skips[1]))
        return out

    def attempt(self, site: str) -> None:
        """The replica at ``site`` is about to run the request: if the attempt before it
        failed, the request moves on from that one. Until it :meth:`answered`, it counts as failed."""
        if self._failed_at is not None:
            self.moved_from.append(self._failed_at)
            if self.counter is not None:
                self.counter.labels(self.model, self._failed_at).inc()
        self._failed_at = self._at = site

    def answered(self) -> None:
        """The replica of the last :meth:`attempt` answered: no failover from it."""
        self._failed_at = None
