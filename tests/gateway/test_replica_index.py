"""The gateway's ranking from a model's table (``EndpointTable.rank`` through
``replica_index``) answers what the rule (``routing.rank``) answers, for what a request tries."""

from __future__ import annotations

import random

import pytest

from orchestrator.gateway import routing
from orchestrator.gateway.endpoints import EndpointTable
from orchestrator.scheduler import geo

COUNTRIES = ("FR", "DE", "ES", "CH")
TIERS = ("edge", "datacenter", "onprem")


def random_table(rng: random.Random) -> tuple[EndpointTable, list[routing.Endpoint]]:
    """A model's replicas with what ranking looks at drawn at random: shared positions and
    sites (ties), residencies, health, reported and local load, ejections, fallback tiers."""
    fallback = rng.choice([(), ("edge", "datacenter"), ("datacenter",), ("onprem", "edge", "datacenter")])
    spots = [(round(rng.uniform(36, 56), 1), round(rng.uniform(-8, 20), 1)) for _ in range(rng.randint(1, 12))]
    endpoints = []
    for i in range(rng.randint(1, 80)):
        lat, lon = rng.choice(spots)
        site = f"s{rng.randint(0, 40):02d}"
        endpoints.append(routing.Endpoint(
            "m", rng.choice(["d1", "d2"]), site, rng.choice(TIERS), rng.choice(COUNTRIES), "", lat, lon,
            f"http://{site}-{i % 3}", healthy=rng.random() > 0.2, inflight=rng.choice([0, 0, 1, 2, 7]),
            allowed_countries=rng.choice([frozenset(), frozenset({"FR", "DE"}), frozenset({"CH"})]), fallback=fallback,
            api=rng.choice([routing.API_V2, routing.API_V2, routing.API_OPENAI])))
    table = EndpointTable()
    table.replace(endpoints)
    for e in rng.sample(endpoints, k=min(len(endpoints), rng.randint(0, 6))):
        table.eject(e.url)
    for e in rng.sample(endpoints, k=min(len(endpoints), rng.randint(0, 6))):
        for _ in range(rng.randint(1, 3)):
            table.started(e.url)
    return table, endpoints


@pytest.mark.parametrize("seed", range(300))
def test_the_table_ranks_as_the_rule_ranks(seed: int) -> None:
    rng = random.Random(seed)
    table, _ = random_table(rng)
    caller = routing.Caller(*rng.choice([(None, None), (48.85, 2.35), (rng.uniform(36, 56), rng.uniform(-8, 20))]),
                            residency=rng.choice([frozenset(), frozenset({"FR"}), frozenset({"DE", "CH"}), frozenset({"PL"})]))
    position = rng.choice([None, (50.0, 8.0)])
    api = rng.choice([routing.API_V2, routing.API_OPENAI, None])
    limit = rng.choice([None, 1, 3, 10])
    mine = [e for e in table.with_local_load("m") if api is None or e.api == api]
    rule = routing.rank(mine, caller, gateway_position=position, ejected=table.ejected())
    got = table.rank("m", caller, position, api, limit)
    if not mine:
        assert isinstance(got, routing.NoRoute) and got.status == 404
    elif isinstance(rule, routing.NoRoute):
        assert got == rule
    else:
        assert not isinstance(got, routing.NoRoute)
        rule = rule[:limit]
        assert [(r.endpoint.url, r.endpoint.deployment, r.endpoint.site) for r in got] == \
            [(r.endpoint.url, r.endpoint.deployment, r.endpoint.site) for r in rule]
        assert [r.expected_ms for r in got] == pytest.approx([r.expected_ms for r in rule], abs=1e-9)
        assert [r.endpoint.inflight for r in got] == [e.inflight for e in (r.endpoint for r in rule)]


def test_a_request_from_where_one_came_before_computes_no_distance_and_builds_what_it_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model on 2,000 sites: a request from the gateway's own position (callers that give
    none) ranks from distances the first such request computed, and gets the three replicas
    it may try, not 2,000 ranked entries."""
    table = EndpointTable()
    table.replace([routing.Endpoint("m", "d", f"edge-{i:04d}", "edge", "FR", "fr", 42.0 + (i % 100) / 20, -4.0 + (i // 100) / 2,
                                    f"http://edge-{i}:8081") for i in range(2000)])
    computed = 0
    one, many = geo.rtt_ms, geo.rtt_ms_many

    def count_one(*args: float) -> float:
        nonlocal computed
        computed += 1
        return one(*args)

    def count_many(lat: float, lon: float, *arrays):  # noqa: ANN002, ANN202
        nonlocal computed
        computed += len(arrays[0])
        return many(lat, lon, *arrays)

    monkeypatch.setattr(geo, "rtt_ms", count_one)
    monkeypatch.setattr(geo, "rtt_ms_many", count_many)
    first = table.rank("m", routing.Caller(), (48.85, 2.35), limit=3)
    assert 0 < computed <= 2000
    computed = 0
    again = table.rank("m", routing.Caller(), (48.85, 2.35), limit=3)
    assert computed == 0
    assert not isinstance(again, routing.NoRoute) and again == first and len(again) == 3
