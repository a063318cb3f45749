"""The Python client's connection pool (:mod:`orchestrator.client`): how large it is, and
what it means when it is full.

httpx holds a client to a bounded pool of connections, across every replica and gateway it
calls; a request that finds them all busy waits for one, up to the client's timeout, and
then raises ``httpx.PoolTimeout``, among its other timeouts. That one says nothing of the
replica or gateway the request was for (it was never sent): the caller ran more requests at
once than the pool holds. Read as a connection error, it had the client leave a replica
that answers out of rotation, send the request on to the next (which waits on the same
pool) and tell the caller that neither a replica nor the gateway answered. So each request
is sent here, and a full pool raises :class:`~orchestrator.clienterrors.PoolFull`, which
names the client's ``max_connections`` and how to change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from orchestrator.clienterrors import PoolFull

#: The connections a client has at most at a time, by default: httpx's own.
MAX_CONNECTIONS = 100
#: Connections kept open once idle, for the next requests (httpx's own, 20).
KEPT_IDLE = 20


@dataclass(frozen=True)
class Pool:
    """A client's pool: ``size`` connections (None: the transport the caller gave holds its
    own pool), waited for up to ``seconds``, the client's timeout."""

    size: int | None
    seconds: float

    def limits(self) -> httpx.Limits:
        size = MAX_CONNECTIONS if self.size is None else self.size
        return httpx.Limits(max_connections=size, max_keepalive_connections=min(KEPT_IDLE, size))

    def send(self, http: httpx.Client, request: httpx.Request) -> httpx.Response:
        """The answer to ``request``, its body not read yet; :class:`PoolFull` when no
        connection came free for it."""
        try:
            return http.send(request, stream=True)
        except httpx.PoolTimeout:
            raise PoolFull(self.seconds, self.size) from None

    async def asend(self, http: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        """:meth:`send` for an asynchronous client."""
        try:
            return await http.send(request, stream=True)
        except httpx.PoolTimeout:
            raise PoolFull(self.seconds, self.size) from None
