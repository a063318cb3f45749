"""HTTP headers the edge agent and the gateway read from each other's answers.

An agent that is stopping answers 503 with ``Retry-After: 1`` (a caller calling it directly
retries at once, elsewhere) and says it is draining: a gateway takes such a replica out of
rotation for its whole ejection time, where a 503 that only says when to retry (a model
being replaced, loading) takes it out for that long at most.
"""

from __future__ import annotations

#: On an agent's 503: the agent is stopping; the replica will not answer again soon.
DRAINING = "x-edgeplane-draining"
