"""What a control-plane replica that does not lead answers an agent's join.

The agent treats it apart from an unreachable address: a replica that answers is alive,
and a leader is being (or has just been) elected, so the agent comes back within about a
second instead of climbing its reconnect backoff towards 30 s.
"""

from __future__ import annotations

NOT_LEADING = "this control-plane replica does not lead; join the leader (agents try their next --control-plane address)"


def is_not_leading(detail: str) -> bool:
    return detail.startswith(NOT_LEADING.split(";")[0])
