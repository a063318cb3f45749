"""A relayed agent that moves to another replica is dropped by the one it left, which the
leader tells, rather than found lost there: the hubs' side of it, with an injected clock
(the whole story through real replicas: ``tests/controlplane/test_inventory.py``)."""

from __future__ import annotations

from orchestrator.agents import auth, hub, model

TOKEN = "t0k3n"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Outbox:
    """What the leader sends down one relay stream: here, only the agents to drop."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str, str, str, float]] = []

    def push(self, site: str, assignment_set: model.AssignmentSet) -> None:
        pass

    def refuse(self, site: str, agent_id: str, message: str, holder: str = "", retry_after_s: float = 0.0) -> None:
        self.refused.append((site, agent_id, message, holder, retry_after_s))


def application() -> model.JoinApplication:
    return model.JoinApplication("edge-1", TOKEN, None, "", "http://10.0.0.5:8080", model.Location("FR", "eu-west", 48.8, 2.3),
                                 {}, "0.1.0", 1.0, model.Capacity(cpu_cores=2))


def test_an_agent_that_moves_to_another_follower_is_dropped_by_the_one_it_left() -> None:
    clock = Clock()
    left = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), clock=clock, missed_heartbeats=3)
    grant = left.join(application())
    leader = hub.AgentHub(auth.InMemoryJoinAuthenticator([]), clock=clock, missed_heartbeats=3)
    outboxes = {"cp-2": Outbox(), "cp-3": Outbox()}
    for via, outbox in outboxes.items():
        leader.attach_relay(via, outbox)
    leader.admit_relayed(application(), grant.agent_id, "cp-2")
    clock.now += 1.0
    leader.admit_relayed(application(), grant.agent_id, "cp-3")  # its connection to cp-2 ended; it joined cp-3

    [(site, agent_id, message, holder, retry_after_s)] = outboxes["cp-2"].refused
    assert (site, agent_id, holder, message) == ("edge-1", grant.agent_id, grant.agent_id, f"agent {grant.agent_id} moved to replica cp-3")
    assert outboxes["cp-3"].refused == []
    assert 0 < retry_after_s <= 3.0  # other agents' joins at cp-2 wait until it could be lost
    left.refused_by_leader(site, agent_id, holder, message, retry_after_s)  # as cp-2's relay client hands it on
    assert left.status("edge-1") is None
    clock.now += 10.0
    assert left.sweep() == []  # nothing left there to find lost
    assert (s := leader.status("edge-1")) is not None and s.via == "cp-3" and s.healthy
