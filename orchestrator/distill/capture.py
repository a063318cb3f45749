"""What to capture and where it may be kept: pure decisions, no I/O.

Captured requests are personal data. Three rules decide their fate and live here so
that tests can state them exactly:

- :func:`zone_for` — the jurisdiction of a record: the first zone of the cascade's
  ``capture.zones`` whose countries all lie inside the caller's residency
  (``X-Edgeplane-Residency``), or, for a caller who states none, the first zone that
  holds the country of the site that received the request; either way, only a zone
  inside the deployment's own residency (``placement.residency``: an ``EU`` store may be
  in Germany, no place for a deployment held to France). No such zone: the request is
  not captured, since no store may hold it.
- :class:`Sampler` — the sample rate and the daily cap per zone (UTC days); the random
  draw and the clock are injected. Its count is this process's: it spares the write queue
  what this process alone could not keep, and the count that holds across restarts and
  replicas is the state store's (:class:`orchestrator.distill.store.CaptureWriter`).
- :func:`expired` — retention: a record captured at ``t`` is gone after ``t +
  retentionDays``; and :class:`Covered`, what a deployment's policy covers now, by which
  the stores purge what no policy covers any more.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator.scheduler.residency import expand_residency

DAY_S = 86_400.0


@dataclass(frozen=True)
class CapturePolicy:
    """``spec.cascade.capture`` as the gateway applies it."""

    sample_rate: float
    daily_cap: int
    retention_s: float
    zones: tuple[str, ...]
    #: Which deployment of its name the policy is, and which of its captures: its creation
    #: time as the control plane's store holds it, or when its capture was last turned on
    #: again, an identity (never compared with a clock), stamped on each record it captures;
    #: None when the route does not say (one of an earlier release's control plane).
    deployment: float | None = None


@dataclass(frozen=True)
class Covered:
    """What a capturing deployment's policy covers now: records of the deployment and capture
    ``created`` (its creation time as stored, or when its capture was last turned on again: a
    record stamped with another is a deleted deployment's of that name, or was captured before
    capture was turned off), for ``retention_s`` after capture, in the stores of ``zones``. A record
    outside any of these is covered by no policy and is purged. A record no route stamped
    (captured by an earlier release) is the deployment's when captured after ``created``;
    None: which deployment it is is not known, and no record is purged for it."""

    retention_s: float
    zones: frozenset[str]
    created: float | None = None


def zone_countries(zone: str) -> frozenset[str]:
    return expand_residency([zone])


def zone_for(zones: Sequence[str], caller_residency: frozenset[str], site_country: str | None,
             deployment_residency: frozenset[str] = frozenset()) -> str | None:
    """The zone whose store keeps this request's record, or None (not captured).
    ``deployment_residency``: the countries the deployment's ``placement.residency`` allows
    (empty: any), which bind every record as they bind where it may be served."""
    for zone in zones:
        countries = zone_countries(zone)
        if deployment_residency and not countries <= deployment_residency:
            continue
        if caller_residency:
            if countries <= caller_residency:
                return zone
        elif site_country is not None and site_country in countries:
            return zone
    return None


def expired(captured_at: float, retention_s: float, now: float) -> bool:
    return now >= captured_at + retention_s


@dataclass
class Sampler:
    """Sample rate and daily cap per zone; ``draw`` in [0, 1) and ``clock`` (epoch seconds) injected."""

    draw: Callable[[], float] = field(default_factory=lambda: random.Random().random)
    _day: dict[tuple[str, str], int] = field(default_factory=dict)  # (deployment, zone) -> day number
    _count: dict[tuple[str, str], int] = field(default_factory=dict)

    def take(self, deployment: str, zone: str, policy: CapturePolicy, now: float) -> bool:
        if self.draw() >= policy.sample_rate:
            return False
        key, day = (deployment, zone), int(now // DAY_S)
        if self._day.get(key) != day:
            self._day[key], self._count[key] = day, 0
        if self._count[key] >= policy.daily_cap:
            return False
        self._count[key] += 1
        return True
