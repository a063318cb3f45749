"""Which replica answers a request: a pure ranking of a model's endpoints.

Order of concerns, none of which a later one can override:

1. residency — the deployment's own countries and the caller's ``X-Edgeplane-Residency``;
   an endpoint outside either is never a candidate, even if it is the only healthy one;
2. tokens — a replica that checks API tokens (an agent run with ``--serve-auth token``) is
   no candidate for a request without one to pass on (a gateway run with ``--gateway-auth none``);
3. health — unhealthy endpoints and endpoints the gateway ejected after a failure (when
   every healthy one is ejected, they are tried all the same: an ejection is this
   gateway's guess from a failure, and a 503 to every caller would be sure to fail;
   Envoy's panic threshold does the same);
4. expected latency — great-circle round trip from the caller (or the gateway's own
   position) plus a load penalty per in-flight request;
5. ``spec.routing.fallback`` — when given, tiers are tried in that order, nearest first
   inside each tier.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from orchestrator import header_text
from orchestrator.manifests import schema
from orchestrator.scheduler import geo, residency

#: Milliseconds added to an endpoint's expected latency per request already in flight.
INFLIGHT_PENALTY_MS = 1.5


API_V2 = "v2"
API_OPENAI = "openai"

AUTH_TOKEN = "token"
AUTH_NONE = "none"


@dataclass(frozen=True)
class Endpoint:
    model: str  # the v2 model name
    deployment: str
    site: str
    tier: str
    country: str
    region: str
    lat: float
    lon: float
    url: str  # base: f"{url}/v2/models/{model}/infer", or f"{url}/v1/chat/completions" when api is "openai"
    healthy: bool = True
    inflight: int = 0
    allowed_countries: frozenset[str] = frozenset()  # the deployment's residency; empty = any
    fallback: tuple[str, ...] = ()  # the deployment's spec.routing.fallback
    #: What the replica speaks: API_V2 (KServe v2 tensors) or API_OPENAI (a generative model:
    #: /v1/models, /v1/chat/completions, /v1/completions under ``url``, whatever engine answers).
    api: str = "v2"
    #: The ``model`` an OpenAI request names at this endpoint (a vllm variant's served model name).
    served_model: str = ""
    #: Whether it serves LoRA adapters too, asked for as ``<served model>:<adapter>`` (a vllm variant with ``llm.lora``).
    lora: bool = False
    #: The v2 version the replica answers ``/versions/{v}`` for: the first 12 hex digits of
    #: its model file's sha256 (as the agent and the Ray Serve app name it); "" = not known.
    version: str = ""
    #: Whether the replica checks API tokens: AUTH_TOKEN (an agent run with --serve-auth token),
    #: AUTH_NONE (--serve-auth none, an agent of an earlier version, a data-centre replica).
    #: The Python client sends its token to a replica it calls directly only where it is AUTH_TOKEN.
    auth: str = "none"


@dataclass(frozen=True)
class Caller:
    lat: float | None = None
    lon: float | None = None
    region: str | None = None
    residency: frozenset[str] = frozenset()  # empty = no restriction from the caller
    #: The request carries no token the gateway passes on (``--gateway-auth none``): replicas
    #: that check tokens (``Endpoint.auth`` AUTH_TOKEN) cannot answer it and are not candidates.
    anonymous: bool = False


@dataclass(frozen=True)
class Ranked:
    endpoint: Endpoint
    expected_ms: float


@dataclass(frozen=True)
class NoRoute:
    reason: str
    status: int = 503
    retry_after: int | None = None  # seconds, for a Retry-After header: when a retry can succeed
    #: for the endpoint list's query (a control-API route): the query parameter at fault, and
    #: its ``reason`` word of :class:`orchestrator.api.problems.Reason` (the status's own when None)
    parameter: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class RegionIndex:
    """Centroids of regions, from the sites that declare them."""

    centroids: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_points(cls, points: Iterable[tuple[str, float, float]]) -> RegionIndex:
        grouped: dict[str, list[tuple[float, float]]] = {}
        for region, lat, lon in points:
            if region:
                grouped.setdefault(region, []).append((lat, lon))
        return cls({r: geo.centroid([p[0] for p in pts], [p[1] for p in pts]) for r, pts in grouped.items()})


def parse_caller(location: str | None, region: str | None, residency_header: str | None) -> Caller | NoRoute:
    lat = lon = None
    if location:
        try:
            lat_s, lon_s = location.split(",", 1)
            lat, lon = float(lat_s), float(lon_s)
        except ValueError:
            return NoRoute("X-Edgeplane-Location must be 'lat,lon', e.g. 48.85,2.35", 400)
        if not (-90 <= lat <= 90 and -180 <= lon <= 180) or math.isnan(lat) or math.isnan(lon):
            return NoRoute("X-Edgeplane-Location is outside -90..90, -180..180", 400)
    allowed = _residency(residency_header, "X-Edgeplane-Residency")
    if isinstance(allowed, NoRoute):
        return allowed
    return Caller(lat, lon, _region(header_text.decoded(region or "")), allowed)


def parse_query_caller(lat: str | None, lon: str | None, region: str | None, residency_text: str | None) -> Caller | NoRoute:
    """The caller of the endpoint list (``GET /v1/endpoints/{model}?lat=&lon=&region=&residency=``),
    each error naming its query parameter: a position that cannot be read is the caller's
    mistake to fix, not a reason to answer an empty list."""
    position = _query_position(lat, lon)
    if isinstance(position, NoRoute):
        return position
    allowed = _residency(residency_text, "query parameter residency", "residency")
    if isinstance(allowed, NoRoute):
        return allowed
    return Caller(*(position or (None, None)), _region(region or ""), allowed)


def _region(text: str) -> str | None:
    """The region a caller names, compared as sites declare theirs (:func:`schema.composed`)."""
    return schema.composed(text.strip()) or None


def _query_position(lat: str | None, lon: str | None) -> tuple[float, float] | None | NoRoute:
    """``lat`` and ``lon``: both or neither, each a number in range."""
    if lat is None and lon is None:
        return None
    if lat is None or lon is None:
        given, missing = ("lat", "lon") if lon is None else ("lon", "lat")
        return NoRoute(f"query parameter {given} is given without {missing}: give both (e.g. lat=48.85&lon=2.35) or neither", 400,
                       parameter=missing, problem="BadRequest")
    values = []
    for name, text, limit in (("lat", lat, 90), ("lon", lon, 180)):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not -limit <= value <= limit:  # NaN and infinities are refused here too
            return NoRoute(f"query parameter {name} must be a number in [-{limit}, {limit}], not {text[:40]!r}", 400,
                           parameter=name, problem="InvalidParameter")
        values.append(value)
    return values[0], values[1]


def _residency(text: str | None, name: str, parameter: str | None = None) -> frozenset[str] | NoRoute:
    """The countries of a residency list (``FR,DE``, ``EU``; ``name`` says where it was given,
    ``parameter`` names the query parameter when it was one);
    empty when none is given: any. A list that names no country (``,``) or a code that is no
    country (``UK``: ISO says GB) is refused as a manifest's would be: read as "any", or as a
    country no replica can be in, it would widen the caller's rule or answer 503, silently."""
    if text is None or not text.strip():
        return frozenset()
    entries = [c.strip() for c in text.split(",") if c.strip()]
    if (unknown := refused_residency_code(entries)) is not None:
        return NoRoute(f"{name}: {unknown}", 400, parameter=parameter, problem="InvalidParameter")
    if not entries:
        return NoRoute(f"{name}: {text.strip()!r} names no country; give ISO 3166 alpha-2 codes or groups, e.g. FR,DE or EU", 400,
                       parameter=parameter, problem="InvalidParameter")
    return residency.expand_residency(entries)


def refused_residency_code(entries: Iterable[str]) -> str | None:
    """Why the first of ``entries`` (trimmed, in any case) that is neither an ISO 3166 alpha-2
    country code nor a known group is refused, quoting it as given; None when each is one. A
    caller's residency and a token's (:func:`orchestrator.gateway.scoping.invalid_residency`)
    are read alike."""
    for entry in entries:
        try:
            schema.check_residency(entry.upper())
        except ValueError:
            return (f"{entry!r} is neither an ISO 3166 alpha-2 country code (e.g. FR, DE) "
                    f"nor a known group ({', '.join(schema.RESIDENCY_GROUPS)})")
    return None


#: How many regions an error lists before it ends the list with "…".
LISTED_REGIONS = 20
#: How many sites an error lists before it ends the list with "…" and how many more there are:
#: a model on every site of a large fleet would otherwise be answered a body naming thousands,
#: on every request, while an outage makes clients retry hardest.
LISTED_SITES = 20


def listed_sites(sites: Collection[str]) -> str:
    """``sites`` sorted, at most :data:`LISTED_SITES` of them, then how many more."""
    names = sorted(sites)
    shown = ", ".join(names[:LISTED_SITES])
    return shown if len(names) <= LISTED_SITES else f"{shown}, … and {len(names) - LISTED_SITES:,} more"


def check_region(region: str, known: Collection[str], name: str, instead: str, parameter: str | None = None) -> NoRoute | None:
    """Refuse a region no site declares (``name`` says where it was given, ``instead`` what
    to give): taken as no position at all, a misspelt region would route the caller from
    the gateway's position, silently."""
    if region in known:
        return None
    listed = sorted(known)
    shown = ", ".join(listed[:LISTED_REGIONS]) + (", …" if len(listed) > LISTED_REGIONS else "")
    return NoRoute(f"{name}: unknown region {region!r} (known regions: {shown or 'none, no site declares one'}); "
                   f"give {instead} instead", 400, parameter=parameter, problem="InvalidParameter")


def position_of(caller: Caller, regions: RegionIndex, default: tuple[float, float] | None) -> tuple[float, float] | None:
    """Where distances are measured from: the caller's coordinates, its region's centroid, or ``default``."""
    if caller.lat is not None and caller.lon is not None:
        return caller.lat, caller.lon
    if caller.region and caller.region in regions.centroids:
        return regions.centroids[caller.region]
    return default


NOT_PLACED = "no replica of this model is placed or running yet"
OUTSIDE_DEPLOYMENT_RESIDENCY = "no replica inside the deployment's residency"


def outside_caller_residency(caller: Caller, countries: Collection[str]) -> str:
    return f"no replica in the caller's residency ({', '.join(sorted(caller.residency))}); replicas run in {', '.join(sorted(countries))}"


def needs_token(sites: Collection[str]) -> str:
    return (f"every replica the caller may use checks API tokens (edgeplane-agent --serve-auth token: {listed_sites(sites)}) "
            "and this request has none the gateway passes on: it runs with --gateway-auth none; run it with "
            "--gateway-auth token and send Authorization: Bearer <API token>, or serve the model where agents run --serve-auth none")


def no_healthy_replica(sites: Collection[str]) -> str:
    return f"no healthy replica among the allowed sites ({listed_sites(sites)})"


def no_version(model: str, version: str, served: Collection[str]) -> str:
    return f"model {model!r} has no version {version!r}" + (f" (versions served: {', '.join(sorted(served))})" if served else "")


def holding(ranked: list[Ranked], model: str, version: str) -> list[Ranked] | NoRoute:
    """The replicas of ``ranked`` that may answer for ``version``, in rank order: those that
    report it, then those whose version is not known (a data centre's Serve app); a 404
    naming the versions there are when none may. The rule as it reads; the gateway applies
    it with the ranking, through ``replica_index``, which answers the same."""
    known = [r for r in ranked if r.endpoint.version == version]
    unknown = [r for r in ranked if not r.endpoint.version]
    if known or unknown:
        return known + unknown
    return NoRoute(no_version(model, version, {r.endpoint.version for r in ranked}), 404)


def rank(
    endpoints: Sequence[Endpoint],
    caller: Caller,
    *,
    regions: RegionIndex = RegionIndex(),
    gateway_position: tuple[float, float] | None = None,
    ejected: frozenset[str] = frozenset(),
    panic: bool = True,
) -> list[Ranked] | NoRoute:
    """Candidates best first, or why there are none. ``panic``: when every healthy endpoint
    is ``ejected``, rank them all the same (off where a caller has another way to go: a
    cascade's stage hands over to the next). The rule as it reads; the gateway applies it
    to a model's whole table through ``replica_index``, which answers the same."""
    if not endpoints:
        return NoRoute(NOT_PLACED)
    allowed = [e for e in endpoints if not e.allowed_countries or e.country in e.allowed_countries]
    if caller.residency:
        allowed = [e for e in allowed if e.country in caller.residency]
        if not allowed:
            return NoRoute(outside_caller_residency(caller, {e.country for e in endpoints}))
    if not allowed:
        return NoRoute(OUTSIDE_DEPLOYMENT_RESIDENCY)
    if caller.anonymous:
        checking = allowed
        allowed = [e for e in allowed if e.auth != AUTH_TOKEN]
        if not allowed:
            return NoRoute(needs_token({e.site for e in checking}))
    live = [e for e in allowed if e.healthy and e.url not in ejected]
    if not live and panic:
        live = [e for e in allowed if e.healthy]
    if not live:
        return NoRoute(no_healthy_replica({e.site for e in allowed}))
    where = position_of(caller, regions, gateway_position)
    scored = []
    for e in live:
        distance = geo.rtt_ms(where[0], where[1], e.lat, e.lon) if where else 0.0
        scored.append(Ranked(e, distance + INFLIGHT_PENALTY_MS * e.inflight))
    order = {t: i for i, t in enumerate(live[0].fallback)} if live[0].fallback else {}
    scored.sort(key=lambda r: (order.get(r.endpoint.tier, len(order)), r.expected_ms, r.endpoint.site))
    return scored
