"""The endpoint table on the wire: what the control plane's watch sends, what a standalone
gateway applies, and the endpoint list clients read. Both sides use this module only.

A table document is plain JSON::

    {"endpoints": [{"model": ..., "site": ..., "url": ..., ...}],
     "regions": {"fr": [48.8, 2.3]},
     "deployed": {"model": "why it has no endpoint"},
     "cold": ["model scaled to zero"],
     "pending": ["model of a deployment just applied, its replicas being placed"],
     "starting": ["model whose replicas are placed and do not answer yet"],
     "cascades": {"model or deployment": {"model": ..., "stages": [...], ...}},
     "energy": {"site": {"carbonGPerKwh": ..., "pue": ...}}}

``energy`` is the fleet's, once for every cascade (each route refers to it): written into
each route, as releases before did, the document grew as sites × cascades × 2 (each route
is listed under its model and its deployment), 9 MB at 5,000 sites and 20 cascades. A
route that carries its own ``energy`` (a document of an earlier release) keeps it; a
gateway of an earlier release reading this document ignores the top-level key and counts
cascade energy at PUE 1 and 0 gCO2 until it is upgraded (it routes the same).

The watch (``GET /v1/endpoints?watch=1``, :mod:`orchestrator.api.watch`) sends it as
newline-delimited events: ``{"type": "snapshot", "epoch": ..., "version": ..., "table": {...}}``
first, then after every change ``{"type": "delta", "epoch": ..., "version": v, "base": v - 1,
"upsert": [...], "remove": [[model, deployment, site, url], ...]}`` (plus ``regions``,
``deployed``, ``cold``, ``pending``, ``starting``, ``cascades`` and ``energy`` whole when they changed), and ``{"type": "heartbeat",
...}`` in between.
"""

from __future__ import annotations

import dataclasses

import orjson
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.distill import capture as capture_mod
from orchestrator.gateway import cascade_rules as rules
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing


#: Where the leading control-plane replica keeps its table document in the store, for the
#: other replicas' gateways to route from.
PUBLISHED_KEY = "gateway-table"


class WireError(ValueError):
    """A table document that does not have the expected shape."""


def endpoint_to_json(e: routing.Endpoint) -> dict[str, Any]:
    return {"model": e.model, "deployment": e.deployment, "site": e.site, "tier": e.tier, "country": e.country,
            "region": e.region, "lat": e.lat, "lon": e.lon, "url": e.url, "healthy": e.healthy, "inflight": e.inflight,
            "allowedCountries": sorted(e.allowed_countries), "fallback": list(e.fallback), "api": e.api,
            "servedModel": e.served_model, "version": e.version, "lora": e.lora, "auth": e.auth}


def endpoint_from_json(d: Mapping[str, Any]) -> routing.Endpoint:
    return routing.Endpoint(
        model=str(d["model"]), deployment=str(d["deployment"]), site=str(d["site"]), tier=str(d["tier"]),
        country=str(d["country"]), region=str(d["region"]), lat=float(d["lat"]), lon=float(d["lon"]), url=str(d["url"]),
        healthy=bool(d.get("healthy", True)), inflight=int(d.get("inflight", 0)),
        allowed_countries=frozenset(str(c) for c in d.get("allowedCountries", ())),
        fallback=tuple(str(t) for t in d.get("fallback", ())), api=str(d.get("api", routing.API_V2)),
        served_model=str(d.get("servedModel", "")), version=str(d.get("version", "")), lora=bool(d.get("lora", False)),
        auth=routing.AUTH_TOKEN if d.get("auth") == routing.AUTH_TOKEN else routing.AUTH_NONE,  # absent from an earlier release's
    )


def _rule_to_json(rule: rules.Rule | None) -> dict[str, Any] | None:
    if isinstance(rule, rules.TensorRule):
        return {"kind": "tensor", "output": rule.output, "logits": rule.logits, "measure": rule.measure, "below": rule.below,
                "independent": rule.independent}
    if isinstance(rule, rules.GenerativeRule):
        return {"kind": "generative", "meanLogprobBelow": rule.mean_logprob_below, "truncated": rule.truncated,
                "refusal": list(rule.refusal)}
    return None


def _rule_from_json(d: Mapping[str, Any] | None) -> rules.Rule | None:
    if d is None:
        return None
    if d["kind"] == "tensor":
        return rules.TensorRule(str(d["output"]), bool(d["logits"]), d["measure"], float(d["below"]),
                                bool(d.get("independent", False)))  # absent from an earlier release's table
    if d["kind"] == "generative":
        below = d.get("meanLogprobBelow")
        return rules.GenerativeRule(float(below) if below is not None else None, bool(d.get("truncated", False)),
                                    tuple(str(r) for r in d.get("refusal", ())))
    raise WireError(f"unknown escalation rule kind {d['kind']!r}")


def cascade_to_json(route: rules.CascadeRoute) -> dict[str, Any]:
    """A route without its sites' energy: the document carries the fleet's once (:func:`fleet_energy`)."""
    c = route.capture
    return {
        "model": route.model, "deployment": route.deployment,
        "stages": [{"variant": s.variant, "tiers": sorted(s.tiers), "rule": _rule_to_json(s.rule), "maxInflight": s.max_inflight,
                    "watts": s.watts} for s in route.stages],
        "capture": None if c is None else {"sampleRate": c.sample_rate, "dailyCap": c.daily_cap, "retentionS": c.retention_s,
                                           "zones": list(c.zones),
                                           **({"deploymentCreated": c.deployment} if c.deployment is not None else {})},
    }


def fleet_energy(cascades: Mapping[str, rules.CascadeRoute]) -> dict[str, rules.SiteEnergy]:
    """Every site's energy the routes know, once: the routes of one pass share one map of the
    fleet's (:func:`orchestrator.reconciler.planning.cascade_routes`), so it is read once."""
    out: dict[str, rules.SiteEnergy] = {}
    seen: set[int] = set()
    for route in cascades.values():
        if id(route.energy) not in seen:
            seen.add(id(route.energy))
            out.update(route.energy)
    return out


def _energy_to_json(energy: Mapping[str, rules.SiteEnergy]) -> dict[str, Any]:
    return {site: {"carbonGPerKwh": e.carbon_g_per_kwh, "pue": e.pue} for site, e in sorted(energy.items())}


def _energy_from_json(d: Mapping[str, Any]) -> dict[str, rules.SiteEnergy]:
    return {str(site): rules.SiteEnergy(float(e["carbonGPerKwh"]), float(e.get("pue", 1.0))) for site, e in d.items()}


def cascade_from_json(d: Mapping[str, Any], energy: Mapping[str, rules.SiteEnergy] | None = None) -> rules.CascadeRoute:
    """``energy``: the document's fleet-wide map, which the route refers to unless it carries its own."""
    stages = tuple(rules.StageRoute(str(s["variant"]), frozenset(s["tiers"]), _rule_from_json(s.get("rule")),
                                    s.get("maxInflight"), float(s.get("watts", 0.0))) for s in d["stages"])
    energy = _energy_from_json(d["energy"]) if "energy" in d else energy if energy is not None else {}
    c = d.get("capture")
    capture = None if c is None else capture_mod.CapturePolicy(
        float(c["sampleRate"]), int(c["dailyCap"]), float(c["retentionS"]), tuple(c["zones"]),
        float(c["deploymentCreated"]) if c.get("deploymentCreated") is not None else None)  # absent from an earlier release's
    return rules.CascadeRoute(str(d["model"]), str(d["deployment"]), stages, energy, capture)


@dataclass(frozen=True)
class TableContents:
    """What a table document holds, as values: equal contents mean an equal document."""

    endpoints: tuple[routing.Endpoint, ...]
    regions: routing.RegionIndex
    deployed: Mapping[str, str]
    cold: frozenset[str]
    cascades: Mapping[str, rules.CascadeRoute]
    pending: frozenset[str] = frozenset()
    starting: frozenset[str] = frozenset()


def only_load_changed(old: TableContents, new: TableContents) -> bool:
    """Whether ``new`` differs from ``old`` in endpoints' in-flight counts alone (the agents'
    load, which moves at nearly every heartbeat of a busy fleet). Only the endpoints that
    differ are compared field by field."""
    if ((old.regions, old.deployed, old.cold, old.cascades, old.pending, old.starting)
            != (new.regions, new.deployed, new.cold, new.cascades, new.pending, new.starting)):
        return False
    if len(old.endpoints) != len(new.endpoints):
        return False
    return all(a == b or dataclasses.replace(a, inflight=b.inflight) == b for a, b in zip(old.endpoints, new.endpoints, strict=True))


def contents_of(table: endpoints_mod.EndpointTable) -> TableContents:
    """Everything a gateway routes with; the gateway's own load and ejections stay local."""
    return TableContents(tuple(table.all_endpoints()), table.regions, table.deployed(), table.cold(), dict(table.cascades),
                         table.pending(), table.starting())


def contents_to_json(c: TableContents) -> dict[str, Any]:
    return {
        "endpoints": [endpoint_to_json(e) for e in c.endpoints],
        "regions": {r: list(xy) for r, xy in sorted(c.regions.centroids.items())},
        "deployed": dict(sorted(c.deployed.items())),
        "cold": sorted(c.cold),
        "pending": sorted(c.pending),
        "starting": sorted(c.starting),
        "cascades": {name: cascade_to_json(route) for name, route in sorted(c.cascades.items())},
        "energy": _energy_to_json(fleet_energy(c.cascades)),
    }


def contents_from_json(doc: Mapping[str, Any]) -> TableContents:
    """A table document's contents (no table is touched: a standalone gateway decodes off its event loop)."""
    try:
        return TableContents(
            tuple(endpoint_from_json(e) for e in doc["endpoints"]),
            routing.RegionIndex({str(r): (float(c[0]), float(c[1])) for r, c in doc.get("regions", {}).items()}),
            {str(m): str(why) for m, why in doc.get("deployed", {}).items()},
            frozenset(str(m) for m in doc.get("cold", ())),
            _cascades_from_json(doc.get("cascades", {}), _energy_from_json(doc.get("energy", {}))),
            frozenset(str(m) for m in doc.get("pending", ())),
            frozenset(str(m) for m in doc.get("starting", ())),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise WireError(f"not an endpoint table: {type(exc).__name__}: {exc}") from None


def _cascades_from_json(d: Mapping[str, Any], energy: Mapping[str, rules.SiteEnergy]) -> dict[str, rules.CascadeRoute]:
    return {str(name): cascade_from_json(route, energy) for name, route in d.items()}


endpoint_key = endpoints_mod.listing_order  # what names one endpoint across versions: a delta replaces or removes by it


def delta_to_json(old: TableContents, new: TableContents) -> dict[str, Any]:
    """What changed from ``old`` to ``new``: endpoints added or changed (``upsert``, whole),
    removed (``remove``, by key), and each other part whole when it changed. A health flip
    at one site of a 10,000-endpoint table is one endpoint, not the table."""
    before = {endpoint_key(e): e for e in old.endpoints}
    after = {endpoint_key(e): e for e in new.endpoints}
    doc: dict[str, Any] = {
        "upsert": [endpoint_to_json(e) for k, e in after.items() if before.get(k) != e],
        "remove": [list(k) for k in before if k not in after],
    }
    whole = contents_to_json(TableContents((), new.regions, new.deployed, new.cold, new.cascades, new.pending, new.starting))
    if new.regions != old.regions:
        doc["regions"] = whole["regions"]
    if new.deployed != old.deployed:
        doc["deployed"] = whole["deployed"]
    if new.cold != old.cold:
        doc["cold"] = whole["cold"]
    if new.cascades != old.cascades:  # a site's energy is in its routes: both go together
        doc["cascades"], doc["energy"] = whole["cascades"], whole["energy"]
    if new.pending != old.pending:
        doc["pending"] = whole["pending"]
    if new.starting != old.starting:
        doc["starting"] = whole["starting"]
    return doc


def apply_delta(old: TableContents, doc: Mapping[str, Any]) -> TableContents:
    """``old`` with a delta applied (no table is touched), in the order a table lists endpoints."""
    try:
        removed = {(str(k[0]), str(k[1]), str(k[2]), str(k[3])) for k in doc["remove"]}
        upserts = {endpoint_key(e): e for e in (endpoint_from_json(d) for d in doc["upsert"])}
        kept = [upserts.pop(endpoint_key(e), e) for e in old.endpoints if endpoint_key(e) not in removed]
        rest = contents_from_json({"endpoints": [], **{k: doc[k] for k in ("regions", "deployed", "cold", "cascades", "pending", "starting", "energy")
                                                       if k in doc}})
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise WireError(f"not an endpoint-table delta: {type(exc).__name__}: {exc}") from None
    endpoints = sorted([*kept, *upserts.values()], key=endpoint_key)  # the table's own order
    return TableContents(
        tuple(endpoints),
        rest.regions if "regions" in doc else old.regions,
        rest.deployed if "deployed" in doc else old.deployed,
        rest.cold if "cold" in doc else old.cold,
        rest.cascades if "cascades" in doc else old.cascades,
        rest.pending if "pending" in doc else old.pending,
        rest.starting if "starting" in doc else old.starting,
    )


def apply(table: endpoints_mod.EndpointTable, c: TableContents, heard_before: endpoints_mod.HeardBefore | None = None) -> None:
    """Replace ``table``'s contents with ``c`` (cold-start waiters for models that now have an
    endpoint wake); ``heard_before``: see :meth:`~orchestrator.gateway.endpoints.EndpointTable.replace`."""
    table.set_cascades(dict(c.cascades))
    table.replace(c.endpoints, c.regions, dict(c.deployed), c.cold, pending=c.pending, starting=c.starting, followed=True,
                  heard_before=heard_before)


def table_to_json(table: endpoints_mod.EndpointTable) -> dict[str, Any]:
    return contents_to_json(contents_of(table))


def table_to_text(table: endpoints_mod.EndpointTable) -> str:
    """The table document as canonical text: equal tables give equal text (the store keeps a
    new version only when the text changed)."""
    return contents_to_text(contents_of(table))


def contents_to_text(c: TableContents) -> str:
    """:func:`table_to_text` of a table with contents ``c`` (orjson with sorted keys: 7 ms
    for 10,000 endpoints where ``json.dumps`` takes 39 ms)."""
    return orjson.dumps(contents_to_json(c), option=orjson.OPT_SORT_KEYS).decode()


def apply_json(table: endpoints_mod.EndpointTable, doc: Mapping[str, Any]) -> None:
    """Replace ``table``'s contents with ``doc``'s (all or nothing: a bad document changes nothing)."""
    apply(table, contents_from_json(doc))


def endpoint_list(ranked: list[routing.Ranked] | routing.NoRoute, model: str) -> dict[str, Any]:
    """``GET /v1/endpoints/{model}``: the model's endpoints for one caller, best first."""
    if isinstance(ranked, routing.NoRoute):
        return {"model": model, "endpoints": [], "reason": ranked.reason, "ttlSeconds": 2}
    return {
        "model": model,
        "ttlSeconds": 10,
        "endpoints": [
            {"site": r.endpoint.site, "tier": r.endpoint.tier, "country": r.endpoint.country, "region": r.endpoint.region,
             "url": r.endpoint.url, "inferUrl": f"{r.endpoint.url}/v2/models/{r.endpoint.model}/infer",
             "expectedMs": round(r.expected_ms, 2), "deployment": r.endpoint.deployment, "api": r.endpoint.api,
             "auth": r.endpoint.auth,  # "token": the replica checks API tokens, and the client sends its own
             # OpenAI SDK base_url of a generative replica (whatever engine answers there)
             **({"openaiUrl": f"{r.endpoint.url}/v1"} if r.endpoint.api == routing.API_OPENAI else {}),
             **({"version": r.endpoint.version} if r.endpoint.version else {})}  # the v2 version it answers for
            for r in ranked
        ],
    }
