"""Errors of the agent hub, mapped to gRPC status codes only by the servicer.

    AgentHubError
    ├── JoinRefused               a Join that cannot be granted
    │   ├── NotAuthenticated      bad bootstrap token or credential   -> UNAUTHENTICATED
    │   ├── SiteTaken             a live agent already holds the site -> ALREADY_EXISTS
    │   └── InvalidJoin           malformed site, URL, labels...      -> INVALID_ARGUMENT
    ├── NotJoined                 stream from an agent that must join -> FAILED_PRECONDITION
    ├── Unavailable               the join cannot be checked now (the store) -> UNAVAILABLE
    ├── StaleAssignments          set_assignments with an older version
    └── NoRelayCertificate        a follower has no client certificate for its relay stream
                                  (the agents' CA expired): said once, not sent anywhere
"""

from __future__ import annotations


class AgentHubError(Exception):
    """Base of every error the hub raises on purpose."""


class JoinRefused(AgentHubError):
    pass


class NotAuthenticated(JoinRefused):
    pass


class SiteTaken(JoinRefused):
    def __init__(self, message: str, holder: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.holder = holder  # the live agent's id
        self.retry_after_s = retry_after_s  # until the holder would be lost, if it stops beating


class InvalidJoin(JoinRefused):
    pass


class NotJoined(AgentHubError):
    pass


class Unavailable(AgentHubError):
    pass


class StaleAssignments(AgentHubError):
    pass


class NoRelayCertificate(AgentHubError):
    pass
