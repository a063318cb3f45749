"""One model the control plane wants on a site: the typed value both ends of the
``edgeplane.agent.v1`` stream use, with its proto conversions (and JSON, for the state
file the agent keeps across restarts)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from edgeplane_proto.agent.v1 import agent_pb2 as pb


RUNTIME_ONNX = "onnx"
RUNTIME_GENAI = "onnx-genai"


class DesiredState(enum.Enum):
    SERVING = "SERVING"
    STOPPED = "STOPPED"  # keep the artifact cached on the agent, do not serve it

    def to_proto(self) -> int:
        return pb.DESIRED_STATE_SERVING if self is DesiredState.SERVING else pb.DESIRED_STATE_STOPPED


@dataclass(frozen=True)
class DeclaredTensor:
    """A tensor a Model's variant declares (``spec.variants[].inputs``/``outputs``): a v2
    datatype name and a shape, ``-1`` a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_proto(self) -> pb.TensorDeclaration:
        return pb.TensorDeclaration(name=self.name, datatype=self.datatype, shape=self.shape)

    @classmethod
    def from_proto(cls, msg: pb.TensorDeclaration) -> DeclaredTensor:
        return cls(msg.name, msg.datatype, tuple(msg.shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeclaredTensor:
        return cls(str(doc["name"]), str(doc["datatype"]), tuple(int(d) for d in doc["shape"]))


@dataclass(frozen=True)
class Assignment:
    model: str
    deployment: str
    variant: str
    artifact_url: str
    sha256: str
    desired_state: DesiredState = DesiredState.SERVING
    runtime: str = RUNTIME_ONNX
    #: onnx-genai: sequences generated at once, and requests that may wait (0 = agent default)
    max_concurrent_sequences: int = 0
    max_queued: int = 0
    #: where a download may be redirected, besides the URL's own host (empty: anywhere)
    artifact_hosts: tuple[str, ...] = ()
    #: onnx: what the variant declares the file takes and answers, sent only with the version
    #: it was declared for (empty: not declared, nothing checked)
    inputs: tuple[DeclaredTensor, ...] = ()
    outputs: tuple[DeclaredTensor, ...] = ()
    #: the version serving may be unloaded first when both do not fit the agent's memory
    #: (the deployment's ``rollout.strategy: replaceWhenFull``); else make before break
    replace_when_full: bool = False

    def to_proto(self) -> pb.Assignment:
        return pb.Assignment(
            model=self.model,
            deployment=self.deployment,
            variant=self.variant,
            artifact_url=self.artifact_url,
            sha256=self.sha256,
            desired_state=self.desired_state.to_proto(),  # type: ignore[arg-type]
            runtime=self.runtime,
            generation=pb.GenerationLimits(max_concurrent_sequences=self.max_concurrent_sequences, max_queued=self.max_queued),
            artifact_hosts=self.artifact_hosts,
            inputs=[t.to_proto() for t in self.inputs],
            outputs=[t.to_proto() for t in self.outputs],
            replace_when_full=self.replace_when_full,
        )

    @classmethod
    def from_proto(cls, msg: pb.Assignment) -> Assignment:
        state = DesiredState.STOPPED if msg.desired_state == pb.DESIRED_STATE_STOPPED else DesiredState.SERVING
        return cls(msg.model, msg.deployment, msg.variant, msg.artifact_url, msg.sha256.lower(), state,
                   msg.runtime or RUNTIME_ONNX, msg.generation.max_concurrent_sequences, msg.generation.max_queued,
                   tuple(msg.artifact_hosts), tuple(DeclaredTensor.from_proto(t) for t in msg.inputs),
                   tuple(DeclaredTensor.from_proto(t) for t in msg.outputs), msg.replace_when_full)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "deployment": self.deployment,
            "variant": self.variant,
            "artifact_url": self.artifact_url,
            "sha256": self.sha256,
            "desired_state": self.desired_state.value,
            "runtime": self.runtime,
            "max_concurrent_sequences": self.max_concurrent_sequences,
            "max_queued": self.max_queued,
            "artifact_hosts": list(self.artifact_hosts),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "replace_when_full": self.replace_when_full,
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
            runtime=str(doc.get("runtime", RUNTIME_ONNX)),
            max_concurrent_sequences=int(doc.get("max_concurrent_sequences", 0)),
            max_queued=int(doc.get("max_queued", 0)),
            artifact_hosts=tuple(str(h) for h in doc.get("artifact_hosts", ())),
            inputs=tuple(DeclaredTensor.from_json(t) for t in doc.get("inputs", ())),
            outputs=tuple(DeclaredTensor.from_json(t) for t in doc.get("outputs", ())),
            replace_when_full=bool(doc.get("replace_when_full", False)),
        )
