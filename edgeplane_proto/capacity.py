"""What an agent measured of its machine: the typed value both ends of the
``edgeplane.agent.v1`` stream use, with its proto conversions."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeplane_proto.agent.v1 import agent_pb2 as pb


@dataclass(frozen=True)
class Gpu:
    index: int
    model: str
    memory_total_bytes: int
    # Free memory moves all the time; it is load, not capacity, so equality ignores it.
    memory_free_bytes: int = field(default=0, compare=False)

    def to_proto(self) -> pb.Gpu:
        return pb.Gpu(
            index=self.index,
            model=self.model,
            memory_total_bytes=self.memory_total_bytes,
            memory_free_bytes=self.memory_free_bytes,
        )

    @classmethod
    def from_proto(cls, msg: pb.Gpu) -> Gpu:
        return cls(msg.index, msg.model, msg.memory_total_bytes, msg.memory_free_bytes)


@dataclass(frozen=True)
class Capacity:
    """Measured by the agent; wins over the capacity a Site manifest declares. Two are
    equal when everything placement depends on is (free GPU memory is load)."""

    cpu_cores: int = 0
    memory_total_bytes: int = 0
    gpus: tuple[Gpu, ...] = ()
    execution_providers: tuple[str, ...] = ()
    # The model runtimes the agent runs ("onnx", "onnx-genai"); empty from an agent of a
    # release before it reported them (what the control plane then takes it to run is its own).
    runtimes: tuple[str, ...] = ()

    def to_proto(self) -> pb.Capacity:
        return pb.Capacity(
            cpu_cores=self.cpu_cores,
            memory_total_bytes=self.memory_total_bytes,
            gpus=[g.to_proto() for g in self.gpus],
            execution_providers=list(self.execution_providers),
            runtimes=list(self.runtimes),
        )

    @classmethod
    def from_proto(cls, msg: pb.Capacity) -> Capacity:
        return cls(
            cpu_cores=msg.cpu_cores,
            memory_total_bytes=msg.memory_total_bytes,
            gpus=tuple(Gpu.from_proto(g) for g in msg.gpus),
            execution_providers=tuple(msg.execution_providers),
            runtimes=tuple(msg.runtimes),
        )
