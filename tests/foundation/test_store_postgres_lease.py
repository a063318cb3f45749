"""The leader lease in PostgreSQL: one holder at a time, renewals keep the fencing token,
a take-over after expiry increments it, and a write of intent under a lease that was
lost is refused inside its own transaction (fencing)."""

from __future__ import annotations

import time

import pytest

from orchestrator.store.postgres import Fenced, PostgresStore
from orchestrator.store.sqlite import Event, PlacementRow

from .postgres_server import PostgresServer


def wait_for_lease(store: PostgresStore, holder: str, ttl_s: float, within_s: float) -> float:
    """Polls for the lease (bounded); returns how long it took."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if store.acquire_lease("leader", holder, ttl_s) is not None:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"{holder} did not get the lease within {within_s}s")


def test_one_holder_renewals_keep_the_token_take_over_increments_it_and_fences(postgres: PostgresServer) -> None:
    url = postgres.create_database()
    a, b = PostgresStore(url), PostgresStore(url)
    try:
        lease_a = a.acquire_lease("leader", "a", 0.5)
        assert lease_a is not None and lease_a.token == 1 and 0 < lease_a.remaining_s <= 0.5
        assert b.acquire_lease("leader", "b", 0.5) is None  # held: exactly one leader
        renewed = a.acquire_lease("leader", "a", 0.5)
        assert renewed is not None and renewed.token == 1
        a.replace_placements_fenced(renewed, [PlacementRow("d", "s", "v", 1)], [Event("a", "place", "ModelDeployment", "d", "as leader")])
        # a stops renewing (partitioned, paused); b takes over only once the lease ran out
        took = wait_for_lease(b, "b", 5.0, within_s=5.0)
        assert took > 0.2  # not before a's lease ended
        lease_b = b.acquire_lease("leader", "b", 5.0)
        assert lease_b is not None and lease_b.token == 2
        with pytest.raises(Fenced, match="no longer held"):
            a.replace_placements_fenced(renewed, [PlacementRow("d", "s", "v", 9)], [Event("a", "place", "ModelDeployment", "d", "late")])
        assert a.acquire_lease("leader", "a", 0.5) is None
        assert [p.replicas for p in b.placements()] == [1]  # the deposed leader's late write did not land
        assert [e.reason for e in b.events()] == ["as leader"]
        b.replace_placements_fenced(lease_b, [PlacementRow("d", "s", "v", 2)])
        b.release_lease(lease_b)
        lease_a2 = a.acquire_lease("leader", "a", 0.5)
        assert lease_a2 is not None and lease_a2.token == 3  # released: taken at once, with a new token
    finally:
        a.close()
        b.close()
