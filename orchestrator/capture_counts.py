"""The daily cap of captured records (``spec.cascade.capture.dailyCap``), counted in the
state store.

Why the state store: a gateway's memory forgets its count when the control plane restarts,
and each replica has its own, so either let more than ``dailyCap`` records be kept in a day.
The state store outlives a restart, and replicas on one PostgreSQL store share it. The capture
writer (:class:`orchestrator.distill.store.CaptureWriter`) asks here once per batch, from its
worker thread, never on a request's path; ``GET /v1/cascades`` reads the day's counts here
(:func:`read_today`), so an operator sees a capture that stopped for the day at its cap.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator import catalog
from orchestrator.distill import capture
from orchestrator.distill import store as capture_store
from orchestrator.store import StateStore, StoreError


def key(deployment: str, zone: str) -> str:
    """The state store's count of ``deployment``'s records in ``zone``."""
    return f"capture/{deployment}/{zone}"


@dataclass(frozen=True)
class StoreCounts:
    """:class:`orchestrator.distill.store.DailyCounts` on ``store``."""

    store: StateStore

    def take(self, deployment: str, zone: str, day: int, count: int, cap: int) -> int:
        try:
            return self.store.take_daily(key(deployment, zone), day, count, cap)
        except StoreError as exc:
            raise capture_store.CountUnavailable(f"the daily cap cannot be counted in the state store: {exc}") from exc


def day_of(now: float) -> int:
    """The UTC day ``now`` (epoch seconds) is in, as records are counted (``captured_at // DAY_S``)."""
    return int(now // capture.DAY_S)


def today(zones: Collection[str], daily_cap: int, taken: Mapping[str, int], now: float) -> dict[str, Any]:
    """A capturing cascade's day so far, by zone (``taken``: :func:`read_today`'s counts by
    zone): captured, what is left of ``dailyCap`` and whether capture stopped for the day,
    and when the day ends (UTC midnight) and the count starts again."""
    day = day_of(now)
    by_zone = [{"zone": z, "captured": taken.get(z, 0), "left": max(daily_cap - taken.get(z, 0), 0),
                "capped": taken.get(z, 0) >= daily_cap} for z in zones]
    return {"dailyCap": daily_cap, "day": (catalog.rfc3339(day * capture.DAY_S) or "")[:10],
            "resetsAt": catalog.rfc3339((day + 1) * capture.DAY_S), "zones": by_zone}


def read_today(store: StateStore, deployment: str, zones: Collection[str], now: float) -> dict[str, int]:
    """The records ``deployment`` has kept in each of ``zones`` on ``now``'s UTC day."""
    taken = store.taken_daily([key(deployment, z) for z in zones], day_of(now))
    return {z: taken.get(key(deployment, z), 0) for z in zones}
