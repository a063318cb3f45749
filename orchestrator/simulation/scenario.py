"""What-if scenarios: the hypothetical changes a drill applies to a fleet.

A scenario is a YAML document (``kind: Scenario``) so a drill can be kept next to the
manifests and replayed; the CLI flags and the API build the same value. Parsing is strict
(pydantic, unknown fields refused) and every error names the field. ``Changes`` is the
validated, frozen form that ``whatif.apply_changes`` works from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import units
from orchestrator.manifests import fields, parsing, schema
from orchestrator.scheduler import model as sched

#: Grid intensity assumed for an added site that declares no energy figures (gCO2/kWh);
#: the control plane assumes the same for declared sites (``reconciler.inventory``).
DEFAULT_CARBON_G_PER_KWH = 300.0
#: Sites a scenario may add: the largest fleets run about 10,000, and a what-if that adds
#: more than a whole fleet asks nothing a real drill would.
MAX_ADDED_SITES = 10_000
#: Values a scenario document may hold once YAML aliases are expanded: 10,000 added sites
#: with a few labels each fit. Counted before validation, which would otherwise walk every
#: copy of an aliased site (or of its labels) one by one.
MAX_VALUES = 500_000
#: The most the demand changes matching one demand point may multiply it by, all together:
#: each may give up to ×1,000 and several may match, so a long list would otherwise
#: multiply past the float range (infinite or undefined demand) where no drill asks more
#: than a few thousandfold.
MAX_DEMAND_FACTOR = 1e6
#: How far (degrees of latitude and of longitude) a demand change by lat/lon may be from the
#: demand point it scales: the point as declared, not one near it.
POINT_TOLERANCE = 1e-6


class ScenarioError(ValueError):
    """A scenario that cannot be read: one line naming the source and the field.
    ``field`` is the path to the field (``("spec", "demand", 0, "factor")``) and ``reason``
    what is wrong with it, when the error is about one field."""

    def __init__(self, message: str, field: tuple[str | int, ...] = (), reason: str = ""):
        super().__init__(message)
        self.field = field
        self.reason = reason or message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FailSpec(_Strict):
    sites: list[str] = Field(default_factory=list)
    regions: list[schema.Region] = Field(default_factory=list)
    countries: list[str] = Field(default_factory=list)
    tiers: list[schema.Tier] = Field(default_factory=list)

    @field_validator("countries")
    @classmethod
    def _countries(cls, v: list[str]) -> list[str]:
        return [schema.check_country(c.upper()) for c in v]


class DemandChange(_Strict):
    """Scale the demand of one region, of one point (lat/lon), or (neither given) of all."""

    region: schema.Region | None = None
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    factor: float = Field(ge=0, le=1000)

    @model_validator(mode="after")
    def _where(self) -> DemandChange:
        if (self.lat is None) != (self.lon is None):
            raise ValueError("give both lat and lon, or neither")
        if self.region is not None and self.lat is not None:
            raise ValueError("give 'region' or 'lat'/'lon', not both")
        return self


class SiteChange(_Strict):
    """Another grid intensity, power budget or capacity for one existing site."""

    carbonGramsPerKWh: float | None = Field(default=None, ge=0, le=1e6)
    #: Another power budget (facility watts, as ``spec.energy.powerBudgetWatts``).
    powerBudgetWatts: float | None = Field(default=None, gt=0, le=1e9)
    capacity: schema.Capacity | None = None
    #: Multiplies CPU, memory and GPU counts (0.5: half the site is lost).
    capacityFactor: float | None = Field(default=None, ge=0, le=1000)

    @model_validator(mode="after")
    def _one_capacity(self) -> SiteChange:
        if self.capacity is not None and self.capacityFactor is not None:
            raise ValueError("give 'capacity' or 'capacityFactor', not both")
        return self


class AddedSite(_Strict):
    metadata: schema.Metadata
    spec: schema.SiteSpec


class ScenarioSpec(_Strict):
    fail: FailSpec = Field(default_factory=FailSpec)
    demand: list[DemandChange] = Field(default_factory=list, max_length=10_000)
    sites: dict[str, SiteChange] = Field(default_factory=dict)
    addSites: list[AddedSite] = Field(default_factory=list, max_length=MAX_ADDED_SITES)


class ScenarioDoc(_Strict):
    apiVersion: str = schema.API_VERSION
    kind: Literal["Scenario"] = "Scenario"
    metadata: schema.Metadata = Field(default_factory=lambda: schema.Metadata(name="scenario"))
    spec: ScenarioSpec = Field(default_factory=ScenarioSpec)


@dataclass(frozen=True)
class DemandScale:
    factor: float
    region: str | None = None
    point: tuple[float, float] | None = None

    def matches(self, p: sched.DemandPoint) -> bool:
        if self.region is not None:
            return p.region == self.region
        if self.point is not None:
            return (p.lat is not None and p.lon is not None and abs(p.lat - self.point[0]) < POINT_TOLERANCE
                    and abs(p.lon - self.point[1]) < POINT_TOLERANCE)
        return True


@dataclass(frozen=True)
class SiteEdit:
    carbon_g_per_kwh: float | None = None
    power_budget_watts: float | None = None
    cpu: float | None = None
    memory_gib: float | None = None
    gpus: tuple[sched.GpuGroup, ...] | None = None
    capacity_factor: float | None = None


@dataclass(frozen=True)
class Changes:
    """A scenario, validated: what to fail, scale, edit and add."""

    name: str = "scenario"
    fail_sites: frozenset[str] = frozenset()
    fail_regions: frozenset[str] = frozenset()
    fail_countries: frozenset[str] = frozenset()
    fail_tiers: frozenset[sched.Tier] = frozenset()
    demand: tuple[DemandScale, ...] = ()
    edits: Mapping[str, SiteEdit] = field(default_factory=dict)
    added: tuple[sched.Site, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.fail_sites or self.fail_regions or self.fail_countries or self.fail_tiers
                    or self.demand or self.edits or self.added)

    def describe(self) -> str:
        parts = [f"fail site {s}" for s in sorted(self.fail_sites)]
        parts += [f"fail region {r}" for r in sorted(self.fail_regions)]
        parts += [f"fail country {c}" for c in sorted(self.fail_countries)]
        parts += [f"fail tier {t}" for t in sorted(self.fail_tiers)]
        for d in self.demand:
            where = d.region or (f"{d.point[0]:g},{d.point[1]:g}" if d.point else "all demand")
            parts.append(f"demand {where} ×{d.factor:g}")
        for name, e in sorted(self.edits.items()):
            if e.carbon_g_per_kwh is not None:
                parts.append(f"{name} carbon {e.carbon_g_per_kwh:g} g/kWh")
            if e.power_budget_watts is not None:
                parts.append(f"{name} power budget {units.show_watts(e.power_budget_watts)} W")
            if e.capacity_factor is not None:
                parts.append(f"{name} capacity ×{e.capacity_factor:g}")
            elif e.cpu is not None:
                parts.append(f"{name} capacity {e.cpu:g} CPU")
        parts += [f"add site {s.name}" for s in self.added]
        return ", ".join(parts) or "no change"


def site_from_spec(name: str, labels: Mapping[str, str], spec: schema.SiteSpec) -> sched.Site:
    """A hypothetical site as the planner sees it: healthy, with its declared capacity."""
    capacity = spec.capacity
    return sched.Site(
        name=name,
        tier=sched.Tier(spec.tier),
        country=spec.location.country,
        region=spec.location.region or "",
        lat=spec.location.lat,
        lon=spec.location.lon,
        cpu=capacity.cpu if capacity else 0.0,
        memory_gib=capacity.memoryGiB if capacity else 0.0,
        gpus=tuple(sched.GpuGroup(g.model, g.count, g.memoryGiB) for g in capacity.gpus) if capacity else (),
        carbon_g_per_kwh=spec.energy.carbonGramsPerKWh if spec.energy else DEFAULT_CARBON_G_PER_KWH,
        pue=spec.energy.pue if spec.energy else 1.0,
        power_budget_watts=spec.energy.powerBudgetWatts if spec.energy else None,
        labels=dict(labels),
    )


def from_doc(doc: ScenarioDoc) -> Changes:
    s = doc.spec
    edits = {}
    for name, c in s.sites.items():
        cap = c.capacity
        edits[name] = SiteEdit(
            carbon_g_per_kwh=c.carbonGramsPerKWh,
            power_budget_watts=c.powerBudgetWatts,
            cpu=cap.cpu if cap else None,
            memory_gib=cap.memoryGiB if cap else None,
            gpus=tuple(sched.GpuGroup(g.model, g.count, g.memoryGiB) for g in cap.gpus) if cap else None,
            capacity_factor=c.capacityFactor,
        )
    return Changes(
        name=doc.metadata.name,
        fail_sites=frozenset(s.fail.sites),
        fail_regions=frozenset(s.fail.regions),
        fail_countries=frozenset(s.fail.countries),
        fail_tiers=frozenset(sched.Tier(t) for t in s.fail.tiers),
        demand=tuple(DemandScale(d.factor, d.region, (d.lat, d.lon) if d.lat is not None and d.lon is not None else None)
                     for d in s.demand),
        edits=edits,
        added=tuple(site_from_spec(a.metadata.name, a.metadata.labels, a.spec) for a in s.addSites),
    )


def is_document(data: Any) -> bool:
    """A whole scenario document (a mapping with ``kind`` or ``spec``), not a bare spec."""
    return isinstance(data, dict) and ("kind" in data or "spec" in data)


def parse(data: Any, source: str = "<scenario>") -> Changes:
    """A scenario document (already decoded from YAML/JSON); a bare spec is accepted too."""
    if isinstance(data, dict) and not is_document(data):
        data = {"spec": data}
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a mapping with kind: Scenario and a spec")
    try:
        return from_doc(ScenarioDoc.model_validate(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) if str(p).isprintable() and str(p) else repr(p) for p in first["loc"])  # one line
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        reason = first["msg"].removeprefix("Value error, ")
        if first["type"] in fields.MAPPING_TYPE_ERRORS:
            reason = fields.mapping_wanted(ScenarioDoc, tuple(first["loc"]), first["type"], first.get("input"))
        raise ScenarioError(f"{source}: {where}: {reason}{more}", tuple(first["loc"]), reason) from None


def load_data(text: str | bytes, source: str = "<scenario>") -> Any:
    """The YAML (or JSON) document of a scenario, not yet checked; empty text or ``null``
    is an empty mapping. A ``ScenarioError`` of one line, with the line, when it is not YAML."""
    try:
        data = _json_or_yaml(text) if text else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ScenarioError(f"{source}{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ScenarioError(f"{source}: nested too deeply to be a scenario") from None
    if _more_values_than(data, MAX_VALUES):
        raise ScenarioError(f"{source}: more than {MAX_VALUES:,} values once YAML aliases are expanded; "
                            f"a scenario adds at most {MAX_ADDED_SITES:,} sites")
    return {} if data is None else data


def _json_or_yaml(text: str | bytes) -> Any:
    """JSON (what the CLI sends) is read as such: hundreds of times faster than PyYAML reads
    the same text, which is YAML too. JSON that gives a key twice is read as YAML, which
    refuses it at its line."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError:
        return yaml.load(text, Loader=parsing.SafeLoader)  # noqa: S506 - a SafeLoader (its explicit tags checked)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) < len(pairs):
        raise ValueError("a key given twice")
    return out


def _more_values_than(data: Any, limit: int) -> bool:
    """Whether ``data`` holds more than ``limit`` values, an alias's copies each counted;
    stops counting at the limit, so an alias bomb costs no more than the limit."""
    stack, seen = [data], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def load_text(text: str | bytes, source: str = "<scenario>") -> Changes:
    return parse(load_data(text, source), source)


def merge(a: Changes, b: Changes) -> Changes:
    """Both scenarios at once (a file plus command-line flags); ``b`` wins on a site edit."""
    return Changes(
        name=a.name if a.name != "scenario" else b.name,
        fail_sites=a.fail_sites | b.fail_sites,
        fail_regions=a.fail_regions | b.fail_regions,
        fail_countries=a.fail_countries | b.fail_countries,
        fail_tiers=a.fail_tiers | b.fail_tiers,
        demand=a.demand + b.demand,
        edits={**a.edits, **b.edits},
        added=a.added + b.added,
    )
