"""The leader's endpoint table and cascades survive their trip through the store to other replicas."""

from __future__ import annotations

from orchestrator.distill import capture
from orchestrator.gateway import cascade_rules, endpoints, routing


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


def test_the_published_cascades_read_back_equal() -> None:
    routes = {
        "intent": cascade_rules.CascadeRoute("intent", "intent-eu", (
            cascade_rules.StageRoute("small", frozenset({"edge"}), cascade_rules.TensorRule("probs", True, "margin", 0.2), 8, 15.0),
            cascade_rules.StageRoute("full", frozenset({"datacenter", "edge"}), None),
        ), {"edge-lyon": cascade_rules.SiteEnergy(56.0), "dc-paris": cascade_rules.SiteEnergy(52.0, 1.3)},
            capture.CapturePolicy(0.5, 1000, 86400.0, ("FR", "EU"))),
        "chat": cascade_rules.CascadeRoute("chat", "chat", (
            cascade_rules.StageRoute("tiny", frozenset({"edge"}), cascade_rules.GenerativeRule(-1.5, True, ("I cannot",))),
            cascade_rules.StageRoute("big", frozenset({"datacenter"}), None),
        )),
    }
    assert endpoints.cascades_from_json(endpoints.cascades_to_json(routes)) == routes
