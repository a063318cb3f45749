"""The leader's endpoint table survives its trip through the store to other replicas."""

from __future__ import annotations

from orchestrator.gateway import endpoints, routing


def test_the_published_table_reads_back_equal() -> None:
    table = endpoints.Published(
        (routing.Endpoint("m", "d", "edge-lyon", "edge", "FR", "eu-west", 45.76, 4.83, "http://10.0.0.1:9000",
                          allowed_countries=frozenset({"FR", "DE"}), fallback=("edge", "datacenter")),
         routing.Endpoint("g", "chat", "dc-paris", "datacenter", "FR", "eu-west", 48.85, 2.35, "http://10.0.0.2:8000/x",
                          healthy=False, api="openai", served_model="g-7b")),
        routing.RegionIndex({"eu-west": (47.0, 3.5)}),
        {"cold-model": "scaled to zero"},
        frozenset({"cold-model"}),
    )
    assert endpoints.Published.from_json(table.to_json()) == table
    assert endpoints.Published.from_json(table.to_json()).to_json() == table.to_json()
