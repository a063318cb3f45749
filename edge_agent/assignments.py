"""The desired set of models for this site, as the control plane last sent it.

Plain frozen values with explicit proto and JSON conversions: the uplink turns the wire
message into an :class:`AssignmentSet`, the registry converges on it and the state file
keeps it so a restart without uplink serves the same models.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from edgeplane_proto.agent.v1 import agent_pb2 as pb


class DesiredState(enum.Enum):
    SERVING = "SERVING"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class Assignment:
    model: str
    deployment: str
    variant: str
    artifact_url: str
    sha256: str
    desired_state: DesiredState = DesiredState.SERVING

    @classmethod
    def from_proto(cls, msg: pb.Assignment) -> Assignment:
        state = DesiredState.STOPPED if msg.desired_state == pb.DESIRED_STATE_STOPPED else DesiredState.SERVING
        return cls(msg.model, msg.deployment, msg.variant, msg.artifact_url, msg.sha256.lower(), state)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "deployment": self.deployment,
            "variant": self.variant,
            "artifact_url": self.artifact_url,
            "sha256": self.sha256,
            "desired_state": self.desired_state.value,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Assignment:
        return cls(
            model=str(doc["model"]),
            deployment=str(doc.get("deployment", "")),
            variant=str(doc.get("variant", "")),
            artifact_url=str(doc["artifact_url"]),
            sha256=str(doc["sha256"]),
            desired_state=DesiredState(doc.get("desired_state", "SERVING")),
        )


@dataclass(frozen=True)
class AssignmentSet:
    version: int
    assignments: tuple[Assignment, ...]

    @classmethod
    def from_proto(cls, msg: pb.AssignmentSet) -> AssignmentSet:
        return cls(msg.version, tuple(Assignment.from_proto(a) for a in msg.assignments))

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "assignments": [a.to_json() for a in self.assignments]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AssignmentSet:
        return cls(int(doc["version"]), tuple(Assignment.from_json(a) for a in doc["assignments"]))


EMPTY = AssignmentSet(0, ())
