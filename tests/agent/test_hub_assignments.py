"""The hub's assignment channels: the latest set wins and an older version is refused, and a
site whose agent is forgotten leaves nothing behind and starts afresh if it returns. No
network."""

from __future__ import annotations

import asyncio

import pytest

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import errors, model

from .hub_support import application


async def test_assignments_latest_wins_and_stale_versions_refused(agent_hub) -> None:
    grant = agent_hub.join(application())
    a = model.Assignment("m", "d", "v", "http://x/m.onnx", "a" * 64)
    agent_hub.set_assignments("edge-1", [a], 1)
    agent_hub.set_assignments("edge-1", [a, a], 2)
    with pytest.raises(errors.StaleAssignments):
        agent_hub.set_assignments("edge-1", [], 1)
    stream = agent_hub.watch_assignments("edge-1", grant.agent_id)
    first = await anext(stream)
    assert first.version == 2 and len(first.assignments) == 2
    agent_hub.set_assignments("edge-1", [], 3)
    agent_hub.set_assignments("edge-1", [a], 4)
    assert (await asyncio.wait_for(anext(stream), 1)).version == 4
    # A watch opened again gets the current set first, then each newer one.
    again = agent_hub.watch_assignments("edge-1", grant.agent_id)
    assert (await asyncio.wait_for(anext(again), 1)).version == 4
    agent_hub.set_assignments("edge-1", [], 5)
    assert (await asyncio.wait_for(anext(again), 1)).version == 5


async def test_a_site_whose_agent_is_forgotten_leaves_nothing_and_starts_afresh_if_it_returns(agent_hub, clock) -> None:
    """Nodes come and go for months (the agent DaemonSet names a site per node): a site whose
    lost agent is forgotten, after its last (empty) set, leaves nothing in the hub; its watch
    stream ends. Back under the same name, it is given a set again, as to a new site."""
    a = model.Assignment("m", "d", "v", "http://x/m.onnx", "a" * 64)
    for i in range(3):
        site = f"edge-lyon-node-{i}"
        agent_hub.join(application(site))
        agent_hub.set_assignments(site, [a], 2 * i + 1)
        clock.now += 10.0  # the node is gone: its agent misses its heartbeats
        agent_hub.sweep()
        agent_hub.set_assignments(site, [], 2 * i + 2)
        agent_hub.forget_if_lost(site)  # its Site is no longer stored
        assert agent_hub.status(site) is None and agent_hub.assignments(site) is None
    assert agent_hub.sites() == []

    grant = agent_hub.join(application("edge-lyon-node-0"))
    watch = agent_hub.watch_assignments("edge-lyon-node-0", grant.agent_id)
    agent_hub.set_assignments("edge-lyon-node-0", [a], 7)  # the reconciler reads no set for it: it sends one
    assert (await asyncio.wait_for(anext(watch), 1)).version == 7
    # forgotten while watched, and back with its credential before the stream woke: it watches the new set
    following = asyncio.ensure_future(anext(watch))
    agent_hub.forget("edge-lyon-node-0")
    agent_hub.join(application("edge-lyon-node-0", credential=grant.credential, agent_id=grant.agent_id))
    agent_hub.set_assignments("edge-lyon-node-0", [], 8)
    assert (await asyncio.wait_for(following, 1)).version == 8
    # forgotten for good: the stream ends
    agent_hub.forget("edge-lyon-node-0")
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(watch), 1)
    assert agent_hub.assignments("edge-lyon-node-0") is None


async def test_the_tokens_agents_check_go_with_each_set_and_again_when_they_change(agent_hub) -> None:
    """An agent run with --serve-auth token learns a revoked token from its set sent again
    (same version) with the new list; a set relayed from the leader goes with this replica's."""
    grant = agent_hub.join(application())
    a = model.Assignment("m", "d", "v", "http://x/m.onnx", "a" * 64)
    first = pb.ServeTokens(tokens=[pb.ServeToken(sha256="1" * 64, id="t1"), pb.ServeToken(sha256="2" * 64, id="t2")])
    agent_hub.set_serve_tokens(first)
    agent_hub.set_assignments("edge-1", [a], 1, replacing=True)
    stream = agent_hub.watch_assignments("edge-1", grant.agent_id, tokens=True)
    sent = (await asyncio.wait_for(anext(stream), 1)).to_proto()
    assert sent.version == 1 and sent.serve_tokens == first
    agent_hub.set_serve_tokens(pb.ServeTokens(tokens=[first.tokens[0]]))  # t2 revoked
    agent_hub.set_serve_tokens(pb.ServeTokens(tokens=[first.tokens[0]]))  # the same list read again: nothing sent
    again = (await asyncio.wait_for(anext(stream), 1)).to_proto()
    assert again.version == 1 and [t.id for t in again.serve_tokens.tokens] == ["t1"]
    agent_hub.set_assignments("edge-1", [], 2)
    assert (await asyncio.wait_for(anext(stream), 1)).to_proto().serve_tokens.tokens[0].id == "t1"


async def test_an_agent_that_checks_no_token_is_sent_no_token_list(agent_hub) -> None:
    """An agent run with --serve-auth none (the default) is sent its sets without the list
    (no digest or scope reaches a box that checks none) and nothing when only the list changes."""
    grant = agent_hub.join(application())
    a = model.Assignment("m", "d", "v", "http://x/m.onnx", "a" * 64)
    agent_hub.set_serve_tokens(pb.ServeTokens(tokens=[pb.ServeToken(sha256="1" * 64, id="t1")]))
    agent_hub.set_assignments("edge-1", [a], 1, replacing=True)
    stream = agent_hub.watch_assignments("edge-1", grant.agent_id)
    assert not (await asyncio.wait_for(anext(stream), 1)).to_proto().HasField("serve_tokens")
    agent_hub.set_serve_tokens(pb.ServeTokens())
    following_set = asyncio.ensure_future(anext(stream))
    for _ in range(20):  # turns of the loop, not time: the watch would send a set at once
        await asyncio.sleep(0)
    assert not following_set.done()
    agent_hub.set_assignments("edge-1", [], 2)
    following = (await asyncio.wait_for(following_set, 1)).to_proto()
    assert following.version == 2 and not following.HasField("serve_tokens")
