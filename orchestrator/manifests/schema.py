"""The user-facing documents: ``Site``, ``Model`` and ``ModelDeployment``.

Field names are the product contract (SPEC.md). Every model forbids unknown fields and
checks what a single document can check on its own (ranges, country codes, one-of
rules); checks that need several documents (a deployment naming a missing model) live
in :mod:`orchestrator.manifests.references`.
"""

from __future__ import annotations

import re
import urllib.parse
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

import pycountry
from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator import import_paths
from orchestrator.manifests import cascade as cascade_schema
from orchestrator.manifests.llm import LLM_RESERVED_ENGINE_ARGS, Architecture, LlmSpec, LoraSpec  # noqa: F401  (re-exported)
from orchestrator.manifests.strict import Strict, written

API_VERSION = "edgeplane.io/v1alpha1"
KINDS = ("Site", "Model", "ModelDeployment")

#: Residency groups a manifest may name besides single countries.
RESIDENCY_GROUPS = ("EU",)

#: Patterns of constrained strings; the loader maps each to a hint for the user.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
IMPORT_PATH_PATTERN = r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$"
PERCENT_PATTERN = r"^(100|[1-9]?[0-9])%$"

Tier = Literal["datacenter", "edge"]
#: Runtimes an edge agent runs; ray-serve needs a data centre's Ray cluster.
EDGE_RUNTIMES = ("onnx", "onnx-genai")
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN, max_length=253)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN, max_length=63)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
Positive = Annotated[float, Field(gt=0, le=1e6)]
NonNegative = Annotated[float, Field(ge=0, le=1e6)]
#: A replica's requests per second: at least one per ~17 minutes, so demand / rate stays a count.
Rate = Annotated[float, Field(ge=1e-3, le=1e6)]

_ISO_ALPHA2 = frozenset(c.alpha_2 for c in pycountry.countries)


def check_country(code: str) -> str:
    if code not in _ISO_ALPHA2:
        raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 country code (e.g. FR, DE)")
    return code


def check_residency(code: str) -> str:
    return code if code in RESIDENCY_GROUPS else check_country(code)


def composed(text: str) -> str:
    """``text`` in Unicode's composed form (NFC): a region typed on a Mac (decomposed) and the
    same one typed elsewhere are one region, for the spread, the demand and the gateway."""
    return unicodedata.normalize("NFC", text)


#: A region in any script ("Île-de-France", "北京"), compared in its composed form.
Region = Annotated[str, AfterValidator(composed)]


#: Validated per item, so an error names ``spec.placement.residency[1]``, not the whole list.
ResidencyCode = Annotated[str, AfterValidator(check_residency)]


#: pydantic's validation context for documents users write (the loader passes it): a rule
#: added after objects were stored holds for manifests, while a stored object an earlier
#: version accepted still reads, so the reconciler never stops on it.
MANIFEST = {"manifest": True}


class Metadata(Strict):
    name: Name
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    #: Optimistic concurrency: when given, apply is refused unless it matches the stored one.
    resourceVersion: str | None = None


# --- Site -------------------------------------------------------------------------------


class Location(Strict):
    country: str
    region: Region | None = None
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)

    _country = field_validator("country")(classmethod(lambda cls, v: check_country(v)))


class GpuGroup(Strict):
    model: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    count: int = Field(ge=1, le=1024)
    memoryGiB: Positive


class Capacity(Strict):
    cpu: Positive
    memoryGiB: Positive
    gpus: list[GpuGroup] = Field(default_factory=list, max_length=64)


class Energy(Strict):
    carbonGramsPerKWh: NonNegative
    pue: float = Field(default=1.0, ge=1.0, le=3.0)
    #: The most the site's feed carries for the replicas edgeplane places there, in watts
    #: drawn at the facility (their estimated draw × pue): a hard limit, like capacity.
    powerBudgetWatts: float | None = Field(default=None, gt=0, le=1e9)


class RaySite(Strict):
    #: ``local`` (edgeplane starts and owns a Ray head) or the dashboard URL of a cluster.
    address: str
    #: File holding the Ray auth token (Ray >= 2.60 enables token authentication by default).
    tokenFile: str | None = None
    #: Base URL of the cluster's Serve HTTP proxy, when it is not on the dashboard's host:8000.
    serveUrl: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if v != "local" and not re.fullmatch(r"https?://[^\s/]+(:\d+)?/?", v):
            raise ValueError("must be 'local' or a dashboard URL such as http://ray-head:8265")
        return v


class KubernetesSite(Strict):
    context: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    namespace: Name = "default"
    #: Image of the GPU pods that run vllm variants (Ray's LLM image, or one built from it).
    llmImage: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")] | None = None


class SiteSpec(Strict):
    tier: Tier
    location: Location
    capacity: Capacity | None = None
    energy: Energy | None = None
    ray: RaySite | None = None
    kubernetes: KubernetesSite | None = None
    #: A data centre's cluster whose applications another control plane marked its own
    #: (its id, as this one's Site status says it): take them over, knowingly.
    takeOverFrom: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None

    @model_validator(mode="after")
    def _runtime_matches_tier(self) -> SiteSpec:
        if self.tier == "datacenter":
            if (self.ray is None) == (self.kubernetes is None):
                raise ValueError("a datacenter site needs exactly one of 'ray' or 'kubernetes'")
            if self.capacity is None:
                raise ValueError("a datacenter site needs 'capacity'")
        elif self.ray is not None or self.kubernetes is not None:
            raise ValueError("an edge site runs an edgeplane-agent: 'ray' and 'kubernetes' are for datacenter sites")
        elif self.takeOverFrom is not None:
            raise ValueError("'takeOverFrom' is for datacenter sites, whose cluster another control plane may own")
        return self


# --- Model ------------------------------------------------------------------------------


class Artifact(Strict):
    uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    sha256: Sha256

    # A URL that cannot be parsed is refused in manifests only: one an earlier version stored
    # still reads, and is that variant's artifact error (ArtifactCatalog), not every reader's.
    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str, info: ValidationInfo) -> str:
        if re.match(r"^(https?|file)://", v):
            return _parsable_url(v) if written(info) else v
        if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_./-]*", v) and ".." not in v.split("/"):
            return v  # relative to the control plane's artifact roots
        raise ValueError("must be an http://, https:// or file:// URI, or a path relative to the control plane's --artifact-root")


def _parsable_url(v: str) -> str:
    """A URL every reader of it (control plane, agents, replicas) can parse and open: one they
    could not would fail there, later and for every pass, rather than here."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise ValueError("must not contain control characters")
    try:
        parts = urllib.parse.urlsplit(v)
        parts.port  # noqa: B018 (parsed on access: a port that is not a number raises here)
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from None
    if parts.scheme == "file":
        if "\x00" in urllib.parse.unquote(parts.path):
            raise ValueError("a file:// path must not contain a NUL byte (%00)")
    elif not parts.hostname:
        raise ValueError("an http(s):// URL must name a host")
    return v


class Resources(Strict):
    cpu: float = Field(default=1.0, gt=0, le=1024)
    memoryMiB: int = Field(default=512, gt=0, le=16 * 1024 * 1024)
    gpus: int = Field(default=0, ge=0, le=64)
    gpuMemoryGiB: float = Field(default=0.0, ge=0, le=4096)

    @model_validator(mode="after")
    def _gpu_memory_needs_gpu(self) -> Resources:
        if self.gpuMemoryGiB > 0 and self.gpus == 0:
            raise ValueError("gpuMemoryGiB is set but gpus is 0")
        return self


#: Open Inference Protocol datatypes a tensor declaration may name.
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BF16", "BYTES"]


class TensorSpec(Strict):
    """An input or output a variant declares; ``-1`` is a dimension of any size."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    datatype: Datatype
    shape: list[Annotated[int, Field(ge=-1, le=2**31)]] = Field(max_length=16)


MIB = 1024 * 1024
GIB = 1024 * MIB


class Generative(Strict):
    """What placement needs to know about a generative model (``runtime: onnx-genai``).

    Memory for one replica is the weights plus a full KV cache for every sequence it runs at
    once: ``weightBytes + kvBytesPerToken x contextLength x maxConcurrentSequences``. The
    figures of a package are printed by ``python -m orchestrator.artifacts.genai_package pack``.
    """

    #: Parameter count (informational; shown by ``describe`` and used for nothing else).
    parameters: int = Field(gt=0, le=10**13)
    #: Bytes of the weights as loaded (the ONNX initializers).
    weightBytes: int = Field(gt=0, le=2**44)
    #: Longest sequence (prompt + completion) in tokens; longer prompts are refused.
    contextLength: int = Field(gt=0, le=10_000_000)
    #: KV-cache bytes per token: 2 x layers x KV heads x head size x element size.
    kvBytesPerToken: int = Field(gt=0, le=2**30)
    #: Sequences generated at once by one replica; more requests wait in a bounded queue.
    maxConcurrentSequences: int = Field(default=4, ge=1, le=4096)
    #: Requests that may wait for a sequence slot; beyond it, 429 with Retry-After.
    maxQueued: int = Field(default=16, ge=0, le=100_000)

    def memory_bytes(self) -> int:
        return self.weightBytes + self.kvBytesPerToken * self.contextLength * self.maxConcurrentSequences


class Variant(Strict):
    name: Name
    runtime: Literal["onnx", "onnx-genai", "ray-serve", "vllm"]
    artifact: Artifact | None = None
    generative: Generative | None = None
    importPath: Annotated[str, StringConstraints(pattern=IMPORT_PATH_PATTERN)] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    throughputRps: Rate | None = None
    #: Power drawn by one busy replica; estimated from resources when absent.
    powerWatts: Positive | None = None
    #: What the variant takes and returns, where known (checked across cascade stages).
    inputs: list[TensorSpec] = Field(default_factory=list, max_length=64)
    outputs: list[TensorSpec] = Field(default_factory=list, max_length=64)

    llm: LlmSpec | None = None

    # Refused in manifests only: one an earlier version stored still reads, and fails its
    # deployment alone when a pass renders it (applications.serve_apps), not every pass.
    @field_validator("importPath")
    @classmethod
    def _ray_takes(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and written(info) and (why := import_paths.problem(v)) is not None:
            raise ValueError(f"{v!r} is not an import path Ray Serve takes: {why}")
        return v

    @model_validator(mode="after")
    def _runtime_fields(self) -> Variant:
        if (self.llm is None) != (self.runtime != "vllm"):
            raise ValueError("a vllm variant needs 'llm' (source, contextLength, weightBytes, architecture)"
                             if self.runtime == "vllm" else "'llm' is for vllm variants")
        if self.runtime == "vllm":
            if self.artifact is not None or self.importPath is not None or self.args:
                raise ValueError("a vllm variant takes 'llm', not 'artifact', 'importPath' or 'args'")
            if self.resources.gpus or self.resources.gpuMemoryGiB:
                raise ValueError("a vllm variant's GPUs come from llm.tensorParallelSize and its memory model: "
                                 "leave resources.gpus and resources.gpuMemoryGiB out")
        elif self.runtime in ("onnx", "onnx-genai"):
            if self.artifact is None:
                what = "the package's uri and sha256" if self.runtime == "onnx-genai" else "uri and sha256"
                raise ValueError(f"an {self.runtime} variant needs 'artifact' ({what})")
            if self.importPath is not None:
                raise ValueError("'importPath' is for ray-serve variants")
        else:
            if self.importPath is None:
                raise ValueError("a ray-serve variant needs 'importPath' (package.module:attribute)")
            if self.artifact is not None:
                raise ValueError("'artifact' is for onnx and onnx-genai variants")
        if self.runtime == "onnx-genai":
            if self.generative is None:
                raise ValueError("an onnx-genai variant needs 'generative' (parameters, weightBytes, contextLength, kvBytesPerToken)")
            self._check_memory(self.generative)
        elif self.generative is not None:
            raise ValueError("'generative' is for onnx-genai variants")
        return self

    def _check_memory(self, g: Generative) -> None:
        # Only a GPU memory figure is checked: 0 (the default) means "what the model needs",
        # and the stored spec carries defaults, so a rule on "given or not" would not survive
        # a round trip. Host memory below the need is raised to it (memory_mib).
        need = g.memory_bytes()
        r = self.resources
        if r.gpus > 0 and 0 < r.gpuMemoryGiB * GIB < need:
            detail = (f"weights {_size(g.weightBytes)} + KV cache {g.kvBytesPerToken} B/token x {g.contextLength} tokens"
                      f" x {g.maxConcurrentSequences} sequences = {_size(need)}")
            raise ValueError(f"resources.gpuMemoryGiB ({r.gpuMemoryGiB:g}) is below what the model needs: {detail};"
                             " raise it, leave it out (0) to use that figure, or lower maxConcurrentSequences")

    def memory_mib(self) -> int:
        """Host memory one replica needs: the declared figure, raised to what a CPU generative model takes."""
        g, r = self.generative, self.resources
        if g is None or r.gpus > 0:
            return r.memoryMiB
        return max(r.memoryMiB, -(-g.memory_bytes() // MIB))

    def gpu_memory_gib(self) -> float:
        """GPU memory one replica needs: the declared figure, or (0) what a GPU generative model takes."""
        g, r = self.generative, self.resources
        if g is None or r.gpus == 0 or r.gpuMemoryGiB > 0:
            return r.gpuMemoryGiB
        return g.memory_bytes() / GIB


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


class ModelSpec(Strict):
    description: str | None = None
    variants: list[Variant] = Field(min_length=1, max_length=32)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique, repeated: {', '.join(dup)}")
        return v


# --- ModelDeployment --------------------------------------------------------------------


class Replicas(Strict):
    """``max`` defaults to ``min`` (a fixed count) and both to 1."""

    min: int = Field(default=1, ge=0, le=100_000)
    max: int = Field(default=1, ge=1, le=100_000)

    @model_validator(mode="before")
    @classmethod
    def _max_defaults_to_min(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max" not in data and type(data.get("min")) is int and data["min"] > 1:
            return {**data, "max": data["min"]}
        return data

    @model_validator(mode="after")
    def _order(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Spread(Strict):
    by: Literal["region", "site"]
    maxSkew: int = Field(default=1, ge=1, le=10_000)


def _repeated(values: Iterable[str]) -> str:
    """The values given more than once, as a phrase ('' for none)."""
    return " and ".join(sorted(v for v, n in Counter(values).items() if n > 1))


class PlacementSpec(Strict):
    residency: list[ResidencyCode] = Field(default_factory=list, max_length=300)
    tiers: list[Tier] = Field(default_factory=lambda: ["datacenter", "edge"], min_length=1)
    siteSelector: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    spread: Spread | None = None

    # An overlap (EU and FR) is fine; the same entry twice is a slip, refused in manifests
    # only so a stored object an earlier version accepted still reads.
    @field_validator("residency")
    @classmethod
    def _residency_once_each(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if written(info) and (twice := _repeated(v)):
            raise ValueError(f"{twice} is listed more than once: give each code once")
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers_once_each(cls, v: list[Tier], info: ValidationInfo) -> list[Tier]:
        if written(info) and (twice := _repeated(v)):
            raise ValueError(f"{twice} is listed more than once: give each tier once")
        return v


class DemandPoint(Strict):
    region: Region | None = None
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    rps: NonNegative

    @model_validator(mode="after")
    def _where(self) -> DemandPoint:
        has_point = self.lat is not None and self.lon is not None
        if (self.lat is None) != (self.lon is None):
            raise ValueError("give both lat and lon, or neither")
        if has_point == (self.region is not None):
            raise ValueError("give either 'region' or 'lat'/'lon'")
        return self


class Routing(Strict):
    fallback: list[Tier] = Field(default_factory=list)

    @field_validator("fallback")
    @classmethod
    def _once_each(cls, v: list[Tier], info: ValidationInfo) -> list[Tier]:
        if written(info) and (twice := _repeated(v)):
            raise ValueError(f"{twice} is listed more than once: give each tier once, in the order to try them")
        return v


class Rollout(Strict):
    #: How many edge sites switch to a new version at once: a count, or a percentage
    #: (0-100%) of the sites being upgraded (at least one).
    maxUnavailable: Annotated[int, Field(ge=0, le=100_000)] | Annotated[str, StringConstraints(pattern=PERCENT_PATTERN)] = 1
    #: Canary steps as percentages of the new replicas, e.g. [10, 50, 100].
    canarySteps: list[Annotated[int, Field(ge=1, le=100)]] = Field(default_factory=list)
    #: ``makeBeforeBreak``: an edge agent loads the new version beside the old one, and one
    #: whose memory cannot hold both refuses it (the rollout halts). ``replaceWhenFull``:
    #: such an agent unloads the old version first, and its site answers nothing meanwhile.
    strategy: Literal["makeBeforeBreak", "replaceWhenFull"] = "makeBeforeBreak"


class Autoscaling(Strict):
    #: Mean requests in flight per replica to aim for (measured over each interval).
    targetInflight: int | None = Field(default=None, ge=1)
    #: Requests per second per replica to aim for.
    targetRps: Positive | None = None
    #: A lower replica count is adopted only once every recommendation of this long agreed.
    scaleDownDelaySeconds: int = Field(default=60, ge=0, le=3600)

    @model_validator(mode="after")
    def _one(self) -> Autoscaling:
        if (self.targetInflight is None) == (self.targetRps is None):
            raise ValueError("give exactly one of targetInflight or targetRps")
        return self


class ModelDeploymentSpec(Strict):
    model: Name
    #: One variant everywhere, or one per tier: ``{edge: distilled, datacenter: full}``.
    variant: Name | dict[Tier, Name] | None = None
    replicas: Replicas = Field(default_factory=Replicas)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    demand: list[DemandPoint] = Field(default_factory=list, max_length=1000)
    routing: Routing = Field(default_factory=Routing)
    rollout: Rollout = Field(default_factory=Rollout)
    autoscaling: Autoscaling | None = None
    #: Stages in order (variants this deployment places) and when each escalates.
    cascade: cascade_schema.Cascade | None = None


# --- Documents --------------------------------------------------------------------------


class SiteDoc(Strict):
    apiVersion: Literal["edgeplane.io/v1alpha1"]
    kind: Literal["Site"]
    metadata: Metadata
    spec: SiteSpec


class ModelDoc(Strict):
    apiVersion: Literal["edgeplane.io/v1alpha1"]
    kind: Literal["Model"]
    metadata: Metadata
    spec: ModelSpec


class ModelDeploymentDoc(Strict):
    apiVersion: Literal["edgeplane.io/v1alpha1"]
    kind: Literal["ModelDeployment"]
    metadata: Metadata
    spec: ModelDeploymentSpec


Document = Union[SiteDoc, ModelDoc, ModelDeploymentDoc]


class Reference(Strict):
    """What a delete needs of a document that gives no ``spec``: its kind and name (and, to
    delete only what was read, its ``metadata.resourceVersion``); ``apiVersion`` may go too."""

    apiVersion: Literal["edgeplane.io/v1alpha1"] | None = None
    kind: Literal["Site", "Model", "ModelDeployment"]
    metadata: Metadata

DOC_TYPES: dict[str, type[Strict]] = {"Site": SiteDoc, "Model": ModelDoc, "ModelDeployment": ModelDeploymentDoc}


def variant_for_tier(spec: ModelDeploymentSpec, model: ModelSpec, tier: str) -> Variant | None:
    """The variant a deployment runs on a tier (the first variant when none is named)."""
    wanted: str | None
    if isinstance(spec.variant, dict):
        wanted = spec.variant.get(tier)  # type: ignore[call-overload]
        if wanted is None:
            return None
    else:
        wanted = spec.variant
    if wanted is None:
        candidates = [v for v in model.variants if tier == "datacenter" or v.runtime in EDGE_RUNTIMES]
        return candidates[0] if candidates else None
    return next((v for v in model.variants if v.name == wanted), None)
