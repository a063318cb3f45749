"""The desired set of models for this site, as the control plane last sent it.

Plain frozen values with explicit proto and JSON conversions: the uplink turns the wire
message into an :class:`AssignmentSet`, the registry converges on it and the state file
keeps it so a restart without uplink serves the same models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from edgeplane_proto.assignment import RUNTIME_GENAI, RUNTIME_ONNX, Assignment, DesiredState

__all__ = ["EMPTY", "RUNTIME_GENAI", "RUNTIME_ONNX", "Assignment", "AssignmentSet", "DesiredState", "Replacement"]


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


@dataclass(frozen=True)
class Replacement:
    """replaceWhenFull: the version ``replaced`` that a model's agent unloaded first for the
    load of version ``sha256``, which it loads again if that load fails."""

    sha256: str
    replaced: Assignment

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "replaced": self.replaced.to_json()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Replacement:
        return cls(str(doc["sha256"]), Assignment.from_json(doc["replaced"]))
