"""Helpers of the relay tests: waiting on a condition, matching hub events, and a follower's
hub relayed to a leader's in process, by the relay's own client and servicer on one
injected clock, with no network (the tests hand the leader each report)."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import auth, hub, model, relay, relay_leader

from .conftest import SECRET, SITE, TOKEN


async def until(predicate: object, what: str, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def of(kind: model.AgentEventKind, site: str = SITE) -> object:
    return lambda e: e.kind is kind and e.site == site


class InProcess(NamedTuple):
    now: list[float]  # the clock both hubs read
    follower: hub.AgentHub
    leader: hub.AgentHub
    client: relay.RelayClient  # taps the follower's hub; nothing connects anywhere
    servicer: relay_leader.RelayServicer  # applies to the leader's hub what the test hands it
    stream: relay_leader._Stream

    def exchange(self) -> pb.RelayAssignments:
        """Hands the leader every report the follower's client has batched, and the client
        what the leader sent down the stream meanwhile: the sites to report again, whole."""
        for batch in self.client._batches():
            for report in batch.reports:
                self.servicer._apply(report, self.stream)
        down = self.stream.take()
        for site in down.report_again:
            self.client._touched.add(site)
        return down


def relayed_in_process(leader_tokens: tuple[str, ...] = (), **leader_options: Any) -> InProcess:
    """A follower's hub relayed to a leader's by the relay's own client and servicer, on one
    injected clock, with no network: reports reach the leader when the test delivers them.
    Agents join the leader directly with ``leader_tokens``."""
    now = [1_000.0]
    follower = hub.AgentHub(auth.InMemoryJoinAuthenticator([TOKEN]), clock=lambda: now[0])
    leader = hub.AgentHub(auth.InMemoryJoinAuthenticator(list(leader_tokens)), clock=lambda: now[0], **leader_options)
    client = relay.RelayClient(follower, "cp-follower")
    client.point(relay.Leader("cp-leader", "127.0.0.1:9", SECRET, answers_claims=True))
    stream = relay_leader._Stream()
    stream.via = "cp-follower"
    return InProcess(now, follower, leader, client, relay_leader.RelayServicer(leader, lambda: SECRET), stream)
