"""Errors of the agent hub, mapped to gRPC status codes only by the servicer.

    AgentHubError
    ├── JoinRefused               a Join that cannot be granted
    │   ├── NotAuthenticated      bad bootstrap token or credential   -> UNAUTHENTICATED
    │   ├── SiteTaken             a live agent already holds the site -> ALREADY_EXISTS
    │   └── InvalidJoin           malformed site, URL, labels...      -> INVALID_ARGUMENT
    ├── NotJoined                 stream from an agent that must join -> FAILED_PRECONDITION
    ├── NotLeading                this replica does not lead: try another -> UNAVAILABLE
    └── StaleAssignments          set_assignments with an older version
"""

from __future__ import annotations


class AgentHubError(Exception):
    """Base of every error the hub raises on purpose."""


class JoinRefused(AgentHubError):
    pass


class NotAuthenticated(JoinRefused):
    pass


class SiteTaken(JoinRefused):
    pass


class InvalidJoin(JoinRefused):
    pass


class NotJoined(AgentHubError):
    pass


class NotLeading(AgentHubError):
    """A control-plane replica that does not lead takes no agents: the leader plans only
    with the agents it holds, so an agent held here would be invisible to it."""


class StaleAssignments(AgentHubError):
    pass
