"""The daily cap of captured records (``spec.cascade.capture.dailyCap``), counted in the
state store.

Why the state store: a gateway's memory forgets its count when the control plane restarts,
and each replica has its own, so either let more than ``dailyCap`` records be kept in a day.
The state store outlives a restart, and replicas on one PostgreSQL store share it. The capture
writer (:class:`orchestrator.distill.store.CaptureWriter`) asks here once per batch, from its
worker thread, never on a request's path.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.distill import store as capture_store
from orchestrator.store import StateStore, StoreError


@dataclass(frozen=True)
class StoreCounts:
    """:class:`orchestrator.distill.store.DailyCounts` on ``store``."""

    store: StateStore

    def take(self, deployment: str, zone: str, day: int, count: int, cap: int) -> int:
        try:
            return self.store.take_daily(f"capture/{deployment}/{zone}", day, count, cap)
        except StoreError as exc:
            raise capture_store.CountUnavailable(f"the daily cap cannot be counted in the state store: {exc}") from exc
