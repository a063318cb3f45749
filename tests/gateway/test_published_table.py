"""The leader's endpoint table and cascades survive their trip through the store to other
replicas: the leader publishes ``wire.table_to_text`` and a follower applies it."""

from __future__ import annotations

import dataclasses
import json

from orchestrator.distill import capture
from orchestrator.gateway import cascade_rules, endpoints, routing, wire

ENDPOINTS = (
    routing.Endpoint("m", "d", "edge-lyon", "edge", "FR", "eu-west", 45.76, 4.83, "http://10.0.0.1:9000",
                     allowed_countries=frozenset({"FR", "DE"}), fallback=("edge", "datacenter")),
    routing.Endpoint("g", "chat", "dc-paris", "datacenter", "FR", "eu-west", 48.85, 2.35, "http://10.0.0.2:8000/x",
                     healthy=False, api="openai", served_model="g-7b"),
)
ENERGY = {"edge-lyon": cascade_rules.SiteEnergy(56.0), "dc-paris": cascade_rules.SiteEnergy(52.0, 1.3)}  # the fleet's, one map
ROUTES = {
    "intent": cascade_rules.CascadeRoute("intent", "intent-eu", (
        cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("probs", True, "margin", 0.2), 8, 15.0),
        cascade_rules.StageRoute("full", frozenset({"datacenter", "edge"}), None),
    ), ENERGY, capture.CapturePolicy(0.5, 1000, 86400.0, ("FR", "EU"))),
    "chat": cascade_rules.CascadeRoute("chat", "chat", (
        cascade_rules.StageRoute("tiny", frozenset({"edge"}), cascade_rules.GenerativeRule(-1.5, True, ("I cannot",))),
        cascade_rules.StageRoute("big", frozenset({"datacenter"}), None),
    ), ENERGY),
}


def leader_table() -> endpoints.EndpointTable:
    table = endpoints.EndpointTable()
    table.replace(ENDPOINTS, routing.RegionIndex({"eu-west": (47.0, 3.5)}), {"cold-model": "scaled to zero"}, frozenset({"cold-model"}))
    table.set_cascades(dict(ROUTES))
    return table


def test_the_published_table_reads_back_equal() -> None:
    text = wire.table_to_text(leader_table())
    follower = endpoints.EndpointTable()
    wire.apply_json(follower, json.loads(text))
    assert wire.contents_of(follower) == wire.contents_of(leader_table())
    assert wire.table_to_text(follower) == text


def test_the_published_cascades_read_back_equal() -> None:
    follower = endpoints.EndpointTable()
    wire.apply_json(follower, json.loads(wire.table_to_text(leader_table())))
    assert dict(follower.cascades) == ROUTES


def test_the_table_carries_each_sites_energy_once_however_many_cascades_use_it() -> None:
    sites = {f"edge-{i}": cascade_rules.SiteEnergy(50.0 + i, 1.1) for i in range(200)}
    table = leader_table()
    table.set_cascades({f"{name}-{n}": dataclasses.replace(route, energy=sites) for n in range(20) for name, route in ROUTES.items()})
    doc = json.loads(wire.table_to_text(table))
    assert doc["energy"] == {site: {"carbonGPerKwh": e.carbon_g_per_kwh, "pue": e.pue} for site, e in sites.items()}
    assert all("energy" not in route for route in doc["cascades"].values())
    follower = endpoints.EndpointTable()
    wire.apply_json(follower, doc)
    assert all(route.energy == sites for route in follower.cascades.values())
    assert wire.contents_of(follower) == wire.contents_of(table)


def test_a_table_of_the_release_before_with_each_routes_energy_in_it_reads_the_same() -> None:
    doc = json.loads(wire.table_to_text(leader_table()))
    energy = doc.pop("energy")
    for route in doc["cascades"].values():  # as the release before wrote it
        route["energy"] = energy
    follower = endpoints.EndpointTable()
    wire.apply_json(follower, doc)
    assert dict(follower.cascades) == ROUTES
