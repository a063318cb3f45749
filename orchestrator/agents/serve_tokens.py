"""The API tokens agents are sent, so that one run with ``--serve-auth token`` checks a
caller's token at its own serving ports, uplink or not (docs/security.md, "Scoped tokens").

Why: the endpoint list hands a tenant's app the agents' own addresses, and a token's scope
held only at the gateways would bind nothing there. Each replica reads the tokens that work
from the store (its own writes and the other replicas' alike) every ``every_s`` and gives them
to its hub, which sends them with each site's assignment set on the stream the agents already
watch, and again when they change: a revoked or expired token leaves the list on the next
read. Only digests go out (sha256 of the secret, as the store keeps them), with each token's
models, residency (expanded to countries here, where the groups are known) and expiry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from edgeplane_proto.agent.v1 import agent_pb2 as pb
from orchestrator.agents import hub as hub_mod
from orchestrator.scheduler import residency as residency_mod
from orchestrator.store import values

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How often a replica reads the tokens that work, by default: the longest a revocation
#: takes to reach the agents connected to it (and their uplinks).
REFRESH_S = 1.0


class TokenSource(Protocol):
    """The store, as this reads it: in a worker thread (``run``)."""

    def serve_tokens(self) -> list[values.ServeTokenRow]: ...
    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


def to_proto(rows: Iterable[values.ServeTokenRow]) -> pb.ServeTokens:
    """The tokens ``rows`` as agents are sent them."""
    return pb.ServeTokens(tokens=[
        pb.ServeToken(sha256=r.digest, id=r.id, models=r.models, residency=r.residency,
                      countries=sorted(residency_mod.expand_residency(r.residency)) if r.residency else (),
                      expires_unix_ms=0 if r.expires_at is None else max(1, round(r.expires_at * 1000)))
        for r in rows])


async def run_refresh(store: TokenSource, hub: hub_mod.AgentHub, every_s: float = REFRESH_S) -> None:
    """Read the tokens that work and give them to ``hub``, every ``every_s`` from ``every_s``
    on (the caller gives it the first list), forever (cancel to stop). A read that fails is logged and tried again: the agents keep the last list.
    The rows become a message only when they changed: comparing them costs a small fraction of
    converting them (each residency expanded), which would otherwise hold the event loop every
    second for nothing."""
    last: list[values.ServeTokenRow] | None = None
    while True:
        await asyncio.sleep(every_s)  # the caller gave the hub its first list
        try:
            rows = await store.run(store.serve_tokens)
            if rows != last:
                hub.set_serve_tokens(to_proto(rows))
                last = rows
        except values.StoreUnavailable as exc:  # for now (unreachable, failing over, closing): said in a line
            log.warning("cannot read the API tokens agents check (%s); they keep the last list sent", exc)
        except Exception:  # the loop never dies; the agents keep what they were sent
            log.exception("cannot read the API tokens agents check; they keep the last list sent")
