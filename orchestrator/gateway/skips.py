"""Why an answer came from a replica farther from the caller than others it could have used.

``X-Edgeplane-Failover`` names the replicas a request tried and moved on from; a replica
nearer the caller that the ranking passed over without trying (down, ejected by this
gateway, outside a residency, in a later fallback tier, busier) left no trace, so "why
Frankfurt and not the Lyon edge next door?" had no answer. The answer now says so in
``X-Edgeplane-Skipped`` (:func:`header`): each such replica's site with its reason, nearest
first, at most :data:`LISTED` of them, then ``+N`` for the N sites more. It is written only
when a replica nearer than the one that answered was not tried: an answer from the nearest
(the common case) costs one comparison (``ReplicaIndex.skipped``), and the model's index
keeps the skips of one that is not, with their text (:attr:`Skips.text`), for the same
caller's next requests.

Reasons, in the order the ranking applies its rules (``routing``), the first that holds:

- ``deployment-residency``: outside the residency of the replica's deployment;
- ``residency``: outside the caller's (``X-Edgeplane-Residency``, or its token's);
- ``auth``: it checks API tokens (an agent run with ``--serve-auth token``) and the request
  has none the gateway passes on (the gateway runs with ``--gateway-auth none``);
- ``unhealthy``: the endpoint table holds it down (its agent lost or stopping, its data
  centre's application not answering);
- ``ejected``: this gateway took it out of rotation after failures of its own;
- ``version``: it does not hold the version asked for (or is not known to, where others do);
- ``fallback``: it is in a later tier of the deployment's ``spec.routing.fallback``;
- ``load``: its requests in flight made it slower to answer than the one that did.

Each answer with the header counts once in ``edgeplane_gateway_skipped_total``, by model and
the reason of the nearest replica skipped.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from prometheus_client import Counter

#: The answer's header naming the nearer replicas passed over (:func:`header`).
SKIPPED = "x-edgeplane-skipped"

DEPLOYMENT_RESIDENCY = "deployment-residency"
RESIDENCY = "residency"
AUTH = "auth"
UNHEALTHY = "unhealthy"
EJECTED = "ejected"
VERSION = "version"
FALLBACK = "fallback"
LOAD = "load"
#: Every reason, in the order the rules apply (a replica is given the first that holds).
REASONS = (DEPLOYMENT_RESIDENCY, RESIDENCY, AUTH, UNHEALTHY, EJECTED, VERSION, FALLBACK, LOAD)

#: How many sites the header names before it says how many more (``+N``): a caller far from
#: its residency's sites would otherwise be answered a header naming thousands.
LISTED = 8

# what a site's name may hold in the header: an HTTP token's characters but the list's own , = +
_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*.^_`|~-]")


@dataclass(frozen=True)
class Skips:
    """The nearer replicas' sites an answer passed over, nearest first, each with its reason
    (at most :data:`LISTED`), and how many sites more were (``more``)."""

    listed: tuple[tuple[str, str], ...]
    more: int = 0

    @functools.cached_property
    def text(self) -> str:
        """The header's value, written once: the same skips answer a steady caller each time."""
        entries = [f"{_UNSAFE.sub('_', site)[:63]}={reason}" for site, reason in self.listed]
        return ",".join(entries + ([f"+{self.more}"] if self.more else []))


def header(skips: Skips | None) -> dict[str, str]:
    """``X-Edgeplane-Skipped: edge-lyon-1=unhealthy,edge-lyon-2=residency,+3``; none without skips."""
    return {SKIPPED: skips.text} if skips else {}


def count(counter: Counter | None, model: str, skips: Skips | None) -> None:
    """Count an answer that passed over ``skips`` by the nearest one's reason (nothing without)."""
    if skips and counter is not None:
        counter.labels(model, skips.listed[0][1]).inc()
