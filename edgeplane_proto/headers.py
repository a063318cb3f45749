"""HTTP headers the edge agent and the gateway read from each other's answers, and the
bound of the waits they ask for.

An agent that is stopping answers 503 with ``Retry-After: 1`` (a caller calling it directly
retries at once, elsewhere) and says it is draining: a gateway takes such a replica out of
rotation for its whole ejection time, where a 503 that only says when to retry (a model
being replaced, loading) takes it out for that long at most.
"""

from __future__ import annotations

#: On an agent's 503: the agent is stopping; the replica will not answer again soon.
DRAINING = "x-edgeplane-draining"

#: The longest ``Retry-After`` an agent asks for and the gateway passes on: the openai SDK
#: ignores one over 60 s (and retries after its own 0.5-8 s), so a longer one is lost.
MAX_RETRY_AFTER_S = 60
