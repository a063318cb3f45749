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


# The relay's client batches what happened and its servicer applies each report inside their
# gRPC streams; these helpers take those steps in process, through the relay's private
# methods, as it offers no public seam below the stream. They are the one place the relay
# tests read them.
def batches(client: relay.RelayClient) -> list[pb.RelayReports]:
    """What ``client`` would send the leader now, in messages under its size limit."""
    return client._batches()


def pending_beat(client: relay.RelayClient, site: str) -> tuple[str, pb.Heartbeat]:
    """(agent id, heartbeat) that ``client`` holds for ``site``'s next batch, merged."""
    return client._beats[site]


def leader_stream(via: str) -> relay_leader._Stream:
    """A relay stream on the leader, opened by replica ``via``."""
    stream = relay_leader._Stream()
    stream.via = via
    return stream


def apply(servicer: relay_leader.RelayServicer, report: pb.AgentReport, stream: relay_leader._Stream) -> None:
    """The leader takes ``report``, as it came down ``stream``."""
    servicer._apply(report, stream)


def report_again(client: relay.RelayClient, site: str) -> None:
    """``client`` reports ``site`` whole in its next batch, as when the leader asks it to."""
    client._touched.add(site)


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
        for batch in batches(self.client):
            for report in batch.reports:
                apply(self.servicer, report, self.stream)
        down = self.stream.take()
        for site in down.report_again:
            report_again(self.client, site)
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
    return InProcess(now, follower, leader, client, relay_leader.RelayServicer(leader, lambda: SECRET), leader_stream("cp-follower"))
