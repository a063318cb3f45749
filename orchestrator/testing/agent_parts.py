"""Parts of an agent for tests and benchmarks that drive its front ends in-process."""

from __future__ import annotations

from edge_agent import registry


class OneModel:
    """The part of the agent's model registry the HTTP and gRPC front ends read, serving
    one model the caller loaded."""

    def __init__(self, served: registry.ServedModel) -> None:
        self.served = served

    def get(self, name: str) -> registry.ServedModel | None:
        return self.served if name == self.served.name else None

    def known(self, name: str) -> bool:
        return name == self.served.name

    def serving(self) -> list[registry.ServedModel]:
        return [self.served]
