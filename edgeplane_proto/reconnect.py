"""How an edge agent comes back to a control plane that went away: a contract both sides keep.

The agent reconnects with a jittered exponential backoff (each wait between half and all of
its step), which spreads a fleet's attempts so that thousands of agents do not reach a
control plane that comes back all at once. Through a long outage the step reaches its cap:
an agent whose attempt failed just before a restarted control plane was listening again
tries once more up to ``RECONNECT_MAX_S`` later. A restarted control plane keeps such an
agent's site (its replicas, its endpoints in the gateway's table) for at least that long
after it listens, so it never plans a site as lost whose agent is merely waiting its turn.

A control plane busy with as many joins as it takes at once refuses one more at once,
``RESOURCE_EXHAUSTED`` with ``PUSHBACK_KEY`` in its trailing metadata: the milliseconds to
wait before trying again. The agent waits that long, never less, and up to
``PUSHBACK_JITTER`` times as long (so that agents told alike do not come back together), in
place of its backoff step; the control plane asks for at most ``RECONNECT_MAX_S /
PUSHBACK_JITTER``, so that an agent waiting its turn is still back within the cap above.
"""

from __future__ import annotations

#: The first step of the agent's reconnect backoff (seconds); each failed round doubles it.
RECONNECT_INITIAL_S = 0.5
#: The cap of the step: the longest an agent waits between two attempts.
RECONNECT_MAX_S = 30.0
#: gRPC's retry pushback: trailing metadata naming the milliseconds to wait before a retry.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: An agent told to wait waits between the time asked and this many times it.
PUSHBACK_JITTER = 1.25
#: The longest wait a control plane asks of a refused join (seconds).
PUSHBACK_MAX_S = RECONNECT_MAX_S / PUSHBACK_JITTER
