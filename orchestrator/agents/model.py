"""What the control plane knows about edge agents, as typed values.

The gRPC messages of ``edgeplane.agent.v1`` stop at this module: everything above the
servicer (the hub, the scheduler, the API) sees these frozen dataclasses. Each has an
explicit ``from_proto`` / ``to_proto`` so the wire format can grow without leaking.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.assignment import Assignment, DeclaredTensor, DesiredState  # noqa: F401 (part of this module's vocabulary)
from edgeplane_proto.capacity import Capacity, Gpu  # noqa: F401


class ModelPhase(enum.Enum):
    UNKNOWN = "UNKNOWN"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"

    @classmethod
    def from_proto(cls, value: int) -> ModelPhase:
        return _PHASE_FROM_PROTO.get(value, cls.UNKNOWN)

    def to_proto(self) -> int:
        return _PHASE_TO_PROTO.get(self, pb.MODEL_PHASE_UNSPECIFIED)


_PHASE_FROM_PROTO = {
    pb.MODEL_PHASE_LOADING: ModelPhase.LOADING,
    pb.MODEL_PHASE_READY: ModelPhase.READY,
    pb.MODEL_PHASE_FAILED: ModelPhase.FAILED,
}
_PHASE_TO_PROTO = {phase: value for value, phase in _PHASE_FROM_PROTO.items()}


@dataclass(frozen=True)
class Location:
    country: str = ""
    region: str = ""
    lat: float | None = None
    lon: float | None = None

    @classmethod
    def from_proto(cls, msg: pb.Location) -> Location:
        region = unicodedata.normalize("NFC", msg.region)  # as manifests declare one (schema.composed)
        if msg.has_coordinates:
            return cls(msg.country, region, msg.lat, msg.lon)
        return cls(msg.country, region)

    def to_proto(self) -> pb.Location:
        if self.lat is None or self.lon is None:
            return pb.Location(country=self.country, region=self.region)
        return pb.Location(country=self.country, region=self.region, lat=self.lat, lon=self.lon, has_coordinates=True)


@dataclass(frozen=True)
class ModelState:
    """One model on one agent. ``sha256`` is the version asked for, ``serving_sha256`` the
    version answering requests (a failed upgrade keeps the previous one serving)."""

    name: str
    sha256: str
    phase: ModelPhase
    message: str = ""
    provider: str = ""
    requests_served: int = field(default=0, compare=False)
    serving_sha256: str = ""
    deployment: str = ""
    variant: str = ""
    failures: int = 0  # failed attempts at sha256 so far: a rollout halts on any
    # replaceWhenFull: the version the agent unloaded first for sha256's load under way
    # ("" none); None from an agent of an earlier version, which does not say
    replaced_sha256: str | None = None

    @property
    def serving(self) -> bool:
        return bool(self.serving_sha256)

    @classmethod
    def from_proto(cls, msg: pb.ModelState) -> ModelState:
        return cls(
            name=msg.name,
            sha256=msg.sha256,
            phase=ModelPhase.from_proto(msg.phase),
            message=msg.message,
            provider=msg.provider,
            requests_served=msg.requests_served,
            serving_sha256=msg.serving_sha256,
            deployment=msg.deployment,
            variant=msg.variant,
            failures=msg.failures,
            replaced_sha256=msg.replaced_sha256 if msg.HasField("replaced_sha256") else None,
        )

    def to_proto(self) -> pb.ModelState:
        return pb.ModelState(
            name=self.name, sha256=self.sha256, phase=self.phase.to_proto(), message=self.message, provider=self.provider,
            requests_served=self.requests_served, serving_sha256=self.serving_sha256, deployment=self.deployment,
            variant=self.variant, failures=self.failures,
            **({"replaced_sha256": self.replaced_sha256} if self.replaced_sha256 is not None else {}),
        )


@dataclass(frozen=True)
class AssignmentSet:
    """The full desired set for one site; anything absent is removed by the agent."""

    site: str
    version: int
    assignments: tuple[Assignment, ...]
    #: The API tokens the agent checks at its serving ports (``--serve-auth token``), as
    #: the watch sends them with the set; None: not read yet, sent without.
    serve_tokens: pb.ServeTokens | None = field(default=None, compare=False)

    def to_proto(self) -> pb.AssignmentSet:
        return pb.AssignmentSet(
            version=self.version, assignments=[a.to_proto() for a in self.assignments],
            **({"serve_tokens": self.serve_tokens} if self.serve_tokens is not None else {}),
        )


@dataclass(frozen=True)
class JoinApplication:
    """A Join request after the servicer has validated its shape."""

    site: str
    bootstrap_token: str
    credential: str | None
    agent_id: str
    endpoint_url: str
    location: Location
    labels: Mapping[str, str]
    agent_version: str
    heartbeat_interval: float | None
    capacity: Capacity
    started_unix_ms: int = 0  # when the agent process started (0: an agent of an earlier version does not say)
    checks_tokens: bool = False  # --serve-auth token at its serving ports (False: none, or an earlier version)


@dataclass(frozen=True)
class JoinGrant:
    agent_id: str
    credential: str
    heartbeat_interval: float
    missed_heartbeats_allowed: int

    def to_proto(self) -> pb.JoinResponse:
        return pb.JoinResponse(
            agent_id=self.agent_id,
            credential=self.credential,
            heartbeat_interval_ms=round(self.heartbeat_interval * 1000),
            missed_heartbeats_allowed=self.missed_heartbeats_allowed,
        )


@dataclass(frozen=True)
class AgentStatus:
    """A read-only view of one agent, as returned by :meth:`AgentHub.snapshot`."""

    site: str
    agent_id: str
    endpoint_url: str
    healthy: bool
    last_heartbeat: float  # seconds on the hub's clock (monotonic unless another is injected; AgentHub.wall_time)
    joined_at: float
    location: Location
    labels: Mapping[str, str]
    agent_version: str
    capacity: Capacity
    providers: tuple[str, ...]
    inflight: int
    cpu_percent: float
    memory_available_bytes: int
    models: Mapping[str, ModelState]
    assignment_version: int
    heartbeat_interval: float
    model_load: Mapping[str, ModelLoad] = field(default_factory=dict)
    via: str | None = None  # the control-plane replica that relays this agent; None: connected here
    quiet_until: float = 0.0  # clock seconds until which its last heartbeat allowed silence (0: no quiet spell)
    # Clock seconds since which the site's agent has been healthy without a break: a join, or
    # heartbeats resumed after a loss, sets it; a live agent's new session keeps it (the failback hold-down).
    healthy_since: float = 0.0
    # When the agent process started (Unix ms), as it said at its join: another value than
    # before says it restarted (the failback hold-down); 0 from an agent of an earlier version.
    started_unix_ms: int = 0
    # Whether its serving ports check API tokens (--serve-auth token), as it said at its join:
    # the endpoint list's auth, which tells the Python client whether to send its token there.
    checks_tokens: bool = False

    @property
    def reported(self) -> bool:
        """Whether it sent a heartbeat since it joined: until then what it serves is not known
        (a rollout sends it nothing, a relay reports no state for it)."""
        return self.last_heartbeat > self.joined_at


class AgentEventKind(enum.Enum):
    JOINED = "JOINED"
    RECONNECTED = "RECONNECTED"  # a live agent's new session (after enrolment, a dropped connection)
    LOST = "LOST"
    RECOVERED = "RECOVERED"
    CAPACITY_CHANGED = "CAPACITY_CHANGED"
    MODELS_CHANGED = "MODELS_CHANGED"
    REPORTED = "REPORTED"  # its first heartbeat since it joined: what it serves is known now


@dataclass(frozen=True)
class AgentEvent:
    kind: AgentEventKind
    site: str
    agent_id: str
    at: float
    reason: str
    status: AgentStatus


def frozen_mapping(values: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class ModelLoad:
    """A model's counters on one agent since it started; ``at`` is when the hub got them."""

    requests_total: int
    busy_seconds_total: float
    at: float = 0.0


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat; ``capacity``/``models`` are None when unchanged since the last one."""

    seq: int
    sent_unix_ms: int
    inflight: int
    cpu_percent: float
    memory_available_bytes: int
    assignment_version: int
    draining: bool
    capacity: Capacity | None
    models: tuple[ModelState, ...] | None
    gpu_free_bytes: tuple[tuple[int, int], ...]  # (gpu index, free bytes)
    model_load: tuple[tuple[str, int, float], ...] = ()  # (model, requests, busy seconds)
    quiet_ms: int = 0  # the agent may send nothing this long (sent by agents of earlier versions while loading)

    @classmethod
    def from_proto(cls, msg: pb.Heartbeat) -> Heartbeat:
        return cls(
            seq=msg.seq,
            sent_unix_ms=msg.sent_unix_ms,
            inflight=msg.inflight,
            cpu_percent=msg.cpu_percent,
            memory_available_bytes=msg.memory_available_bytes,
            assignment_version=msg.assignment_version,
            draining=msg.draining,
            capacity=Capacity.from_proto(msg.capacity) if msg.HasField("capacity") else None,
            models=(
                tuple(ModelState.from_proto(m) for m in msg.models.models)
                if msg.HasField("models")
                else None
            ),
            gpu_free_bytes=tuple((g.index, g.memory_free_bytes) for g in msg.gpu_load),
            model_load=tuple((m.name, m.requests_total, m.busy_seconds_total) for m in msg.model_load),
            quiet_ms=msg.quiet_ms,
        )
