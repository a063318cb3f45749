"""The gateway's ranking from a model's table (``EndpointTable.rank`` through
``replica_index``) answers what the rule (``routing.rank``) answers, for what a request tries;
so do a cascade's choice and its stages' rankings (``EndpointTable.cascade_for`` and
``rank_stage``, against ``cascade_rules.cascade_for`` and ``stage_ranking``)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.gateway import cascade, cascade_rules, routing
from orchestrator.gateway.endpoints import EndpointTable
from orchestrator.scheduler import geo

COUNTRIES = ("FR", "DE", "ES", "CH")
TIERS = ("edge", "datacenter", "onprem")
VERSIONS = ("", "0123456789ab", "ba9876543210")  # "": not known (a data centre's Serve app)


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
            api=rng.choice([routing.API_V2, routing.API_V2, routing.API_OPENAI]), version=rng.choice(VERSIONS),
            auth=rng.choice([routing.AUTH_NONE, routing.AUTH_NONE, routing.AUTH_TOKEN])))
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
                            residency=rng.choice([frozenset(), frozenset({"FR"}), frozenset({"DE", "CH"}), frozenset({"PL"})]),
                            anonymous=rng.random() < 0.3)
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


@pytest.mark.parametrize("seed", range(300))
def test_the_table_ranks_a_versioned_request_as_the_rule_ranks_it(seed: int) -> None:
    """``/versions/{v}`` requests: the replicas holding the version, then those whose version
    is not known, each in rank order, the ``limit`` best of them (the rule: ``routing.rank``,
    then ``routing.holding``), or the same refusal."""
    rng = random.Random(seed)
    table, _ = random_table(rng)
    caller = routing.Caller(*rng.choice([(None, None), (48.85, 2.35), (rng.uniform(36, 56), rng.uniform(-8, 20))]),
                            residency=rng.choice([frozenset(), frozenset({"FR"}), frozenset({"DE", "CH"}), frozenset({"PL"})]),
                            anonymous=rng.random() < 0.3)
    position = rng.choice([None, (50.0, 8.0)])
    version = rng.choice([*VERSIONS[1:], "feedfacecafe"])
    deployment = rng.choice([None, "d1"])
    limit = rng.choice([None, 1, 3, 10])
    mine = [e for e in table.with_local_load("m") if e.api == routing.API_V2 and deployment in (None, e.deployment)]
    got = table.rank("m", caller, position, routing.API_V2, limit, deployment, version)
    if not mine:
        assert isinstance(got, routing.NoRoute)
        return
    rule = routing.rank(mine, caller, gateway_position=position, ejected=table.ejected())
    if not isinstance(rule, routing.NoRoute):
        rule = routing.holding(rule, "m", version)
    if isinstance(rule, routing.NoRoute):
        assert got == rule
        return
    assert not isinstance(got, routing.NoRoute)
    rule = rule[:limit]
    assert [(r.endpoint.url, r.endpoint.site, r.endpoint.version, r.endpoint.inflight) for r in got] == \
        [(r.endpoint.url, r.endpoint.site, r.endpoint.version, r.endpoint.inflight) for r in rule]
    assert [r.expected_ms for r in got] == pytest.approx([r.expected_ms for r in rule], abs=1e-9)


class Count:
    """How many replica distances were computed."""

    n = 0


def distances(monkeypatch: pytest.MonkeyPatch) -> Count:
    """Count every replica distance the gateway computes from here on, one at a time or as arrays."""
    computed, one, many = Count(), geo.rtt_ms, geo.rtt_ms_many

    def count_one(*args: float) -> float:
        computed.n += 1
        return one(*args)

    def count_many(lat: float, lon: float, *arrays):  # noqa: ANN002, ANN202
        computed.n += len(arrays[0])
        return many(lat, lon, *arrays)

    monkeypatch.setattr(geo, "rtt_ms", count_one)
    monkeypatch.setattr(geo, "rtt_ms_many", count_many)
    return computed


def test_a_request_from_where_one_came_before_computes_no_distance_and_builds_what_it_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model on 2,000 sites: a request from the gateway's own position (callers that give
    none) ranks from distances the first such request computed, and gets the three replicas
    it may try, not 2,000 ranked entries."""
    table = EndpointTable()
    table.replace([routing.Endpoint("m", "d", f"edge-{i:04d}", "edge", "FR", "fr", 42.0 + (i % 100) / 20, -4.0 + (i // 100) / 2,
                                    f"http://edge-{i}:8081") for i in range(2000)])
    computed = distances(monkeypatch)
    first = table.rank("m", routing.Caller(), (48.85, 2.35), limit=3)
    assert 0 < computed.n <= 2000
    computed.n = 0
    again = table.rank("m", routing.Caller(), (48.85, 2.35), limit=3)
    assert computed.n == 0
    assert not isinstance(again, routing.NoRoute) and again == first and len(again) == 3


def random_cascades(rng: random.Random) -> list[cascade_rules.CascadeRoute]:
    """Cascades of model ``m`` on one or both of its deployments, their stages on random tiers."""
    routes = []
    for deployment in rng.sample(["d1", "d2"], k=rng.randint(1, 2)):
        stages = tuple(cascade_rules.StageRoute(f"v{i}", frozenset(rng.sample(TIERS, k=rng.randint(1, 2))), None)
                       for i in range(rng.randint(1, 3)))
        routes.append(cascade_rules.CascadeRoute("m", deployment, stages))
    return routes


@pytest.mark.parametrize("seed", range(300))
def test_the_table_chooses_and_ranks_cascade_stages_as_the_rule_does(seed: int) -> None:
    rng = random.Random(seed)
    table, _ = random_table(rng)
    routes = random_cascades(rng)
    caller = routing.Caller(*rng.choice([(None, None), (48.85, 2.35), (rng.uniform(36, 56), rng.uniform(-8, 20))]),
                            residency=rng.choice([frozenset(), frozenset({"FR"}), frozenset({"DE", "CH"}), frozenset({"PL"})]),
                            anonymous=rng.random() < 0.3)
    position = rng.choice([None, (50.0, 8.0)])
    loaded = table.with_local_load("m")
    assert table.cascade_for(routes, caller, position) == cascade_rules.cascade_for(
        routes, loaded, caller, gateway_position=position, ejected=table.ejected())
    for route in routes:
        for stage in range(len(route.stages)):
            limit = rng.choice([None, 1, 3])
            rule = cascade_rules.stage_ranking(route, stage, loaded, caller, gateway_position=position, ejected=table.ejected())
            got = table.rank_stage(route, stage, caller, position, limit)
            if isinstance(rule, routing.NoRoute):
                assert got == rule
                continue
            assert not isinstance(got, routing.NoRoute)
            rule = rule[:limit]
            assert [(r.endpoint.url, r.endpoint.tier, r.endpoint.inflight) for r in got] == \
                [(r.endpoint.url, r.endpoint.tier, r.endpoint.inflight) for r in rule]
            assert [r.expected_ms for r in got] == pytest.approx([r.expected_ms for r in rule], abs=1e-9)


def test_a_cascade_request_ranks_only_the_replicas_its_stage_tries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cascade whose two stages run on 2,000 sites each: choosing the cascade and ranking
    a stage from the gateway's position reuse the distances the first request computed, and
    a stage's ranking is the replicas it may try, not 2,000 ranked entries."""
    table = EndpointTable()
    table.replace([routing.Endpoint("m", "d", f"{tier}-{i:04d}", tier, "FR", "fr", 42.0 + (i % 100) / 20, -4.0 + (i // 100) / 2,
                                    f"http://{tier}-{i}:8081") for tier in ("edge", "datacenter") for i in range(2000)])
    route = cascade_rules.CascadeRoute("m", "d", (cascade_rules.StageRoute("small", frozenset({"edge"}), None),
                                                  cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)))
    table.set_cascades({"m": route})
    handler = cascade.CascadeHandler(table, None, cascade.CascadeMetrics.create(CollectorRegistry()),  # type: ignore[arg-type]
                                     position=(48.85, 2.35))
    computed = distances(monkeypatch)

    def request() -> list[list[routing.Ranked] | routing.NoRoute]:
        assert handler.resolve(route, "m", routing.Caller()) == route
        return [handler.ranking(route, stage, routing.Caller()) for stage in (0, 1)]

    first = request()
    computed.n = 0
    again = request()
    assert computed.n == 0 and again == first
    assert [[r.endpoint.tier for r in ranked] for ranked in again] == [["edge"] * 3, ["datacenter"] * 3]  # type: ignore[union-attr]


def test_a_deployment_or_stage_without_replicas_is_answered_without_reading_the_model_again() -> None:
    """A cascade's deployment, or one of its stages, with no replica of a model on 2,000
    sites: asked at every request, it is looked up once per table, not found by reading
    every replica of the model each time."""
    reads = 0

    class Counted(routing.Endpoint):
        def __getattribute__(self, name: str) -> object:
            nonlocal reads
            reads += name in ("deployment", "tier")
            return super().__getattribute__(name)

    table = EndpointTable()
    table.replace([Counted("m", "d", f"edge-{i:04d}", "edge", "FR", "fr", 48.0, 2.0, f"http://edge-{i}:8081") for i in range(2000)])
    route = cascade_rules.CascadeRoute("m", "d", (cascade_rules.StageRoute("small", frozenset({"onprem"}), None),
                                                  cascade_rules.StageRoute("large", frozenset({"edge"}), None)))
    per_round = []
    for _ in range(2):
        reads = 0
        assert isinstance(table.rank("m", routing.Caller(), None, deployment="other"), routing.NoRoute)
        assert table.rank_stage(route, 0, routing.Caller(), None) == routing.NoRoute("stage 'small' has no replica running")
        per_round.append(reads)
    assert per_round[0] >= 2000 and per_round[1] == 0


def sites_of(model: str, n: int = 500) -> list[routing.Endpoint]:
    """``model`` on ``n`` sites (new values each call, as each pass of the control plane makes them)."""
    return [routing.Endpoint(model, f"{model}-edge", f"edge-{i:04d}", "edge", "FR", "fr", 42.0 + (i % 50) / 10, -4.0 + (i // 50) / 2,
                             f"http://edge-{i}:8081/{model}", inflight=i % 3) for i in range(n)]


CHANGES = {
    "load": lambda es, best: [dataclasses.replace(e, inflight=40) if e.url == best else e for e in es],
    "health": lambda es, best: [dataclasses.replace(e, healthy=False) if e.url == best else e for e in es],
    "a replica gone": lambda es, best: [e for e in es if e.url != best],
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_table_change_lays_out_again_only_the_models_whose_replicas_changed(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """A new table where one model's replicas changed (a replica's load, its health, the
    replica itself) and another's are listed alike: the changed model is ranked from its new
    replicas, the other from what the last table laid out (no distance computed again)."""
    table = EndpointTable()
    table.replace([*sites_of("same"), *sites_of("changed")])
    here = (48.85, 2.35)
    before = {m: table.rank(m, routing.Caller(), here, limit=3) for m in ("same", "changed")}
    best = before["changed"][0].endpoint.url  # type: ignore[index]
    changed = CHANGES[change](sites_of("changed"), best)
    table.replace([*sites_of("same"), *changed])
    computed = distances(monkeypatch)
    same = table.rank("same", routing.Caller(), here, limit=3)
    assert computed.n == 0
    assert same == before["same"] == routing.rank(sites_of("same"), routing.Caller(), gateway_position=here)[:3]
    now = table.rank("changed", routing.Caller(), here, limit=3)
    assert computed.n > 0
    assert not isinstance(now, routing.NoRoute) and best not in [r.endpoint.url for r in now]
    assert now == routing.rank(changed, routing.Caller(), gateway_position=here)[:3]  # type: ignore[index]
