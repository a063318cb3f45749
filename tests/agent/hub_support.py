"""What the hub tests hand a hub: the bootstrap token it takes, an injected clock, an agent's
join application and heartbeat with fields the test overrides, and a relay tap that
records the ends of agents' streams. The hubs themselves are conftest.py's fixtures."""

from __future__ import annotations

from orchestrator.agents import model

TOKEN = "t0k3n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def application(site: str = "edge-1", **overrides: object) -> model.JoinApplication:
    fields: dict[str, object] = {
        "site": site,
        "bootstrap_token": TOKEN,
        "credential": None,
        "agent_id": "",
        "endpoint_url": "http://10.0.0.5:8080",
        "location": model.Location("FR", "eu-west", 48.8, 2.3),
        "labels": {"rack": "a"},
        "agent_version": "0.1.0",
        "heartbeat_interval": 1.0,
        "capacity": model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",)),
    }
    fields.update(overrides)
    return model.JoinApplication(**fields)  # type: ignore[arg-type]


def beat(**overrides: object) -> model.Heartbeat:
    fields: dict[str, object] = {
        "seq": 1, "sent_unix_ms": 0, "inflight": 0, "cpu_percent": 1.0, "memory_available_bytes": 1 << 30,
        "assignment_version": 0, "draining": False, "capacity": None, "models": None, "gpu_free_bytes": (),
    }
    fields.update(overrides)
    return model.Heartbeat(**fields)  # type: ignore[arg-type]


def kinds(events: list[model.AgentEvent]) -> list[str]:
    return [e.kind.value for e in events]


class Tap:
    def touched(self, site: str) -> None:
        pass

    def beat(self, site: str, agent_id: str, message: object) -> None:
        pass

    def disconnected(self, site: str, agent_id: str) -> None:
        self.gone.append((site, agent_id))

    def __init__(self) -> None:
        self.gone: list[tuple[str, str]] = []
