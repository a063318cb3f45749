"""What the Python client (:mod:`orchestrator.client`) raises on the way, as one tree.

An application catches the client's failures without knowing httpx, which the client
uses: each ``httpx`` exception is translated where it is caught. ::

    EdgeplaneError
    ├── NoEndpoint       no allowed, healthy replica for the model
    ├── Unreachable      nothing answered (connection refused, timed out)
    │   └── TimedOut     a chat's answer did not come within the client's timeout
    │       └── PoolFull the client's own connections were all busy for its timeout: nothing was sent
    ├── InferenceError   a refusal (4xx): retrying elsewhere would not help
    ├── StreamCut        a generation failed after part of its text was delivered
    └── BadAnswer        an answer that is not what the protocol says, or larger than the client reads

Arguments that cannot work are not in this tree: they raise ``ValueError`` (``TypeError``
for a wrong type) before anything is sent.

Each error a call raises carries the call's ``request_id``: the ``X-Request-Id`` it sent to
every replica and gateway it tried, which their logs and the gateway's answers name; and
``reason``, the machine-readable word of an answer in the control API's error shape
(docs/api.md, "Error reasons"): ``NoRoute`` for a URL where no gateway answers.
"""

from __future__ import annotations


class EdgeplaneError(Exception):
    """Base of the client's errors. ``request_id``: the id of the call that raised it (its
    ``X-Request-Id``, the caller's or one the client made), to quote to an operator; None
    for one raised before the call began. ``reason``: the ``reason`` of the error answer
    that raised it, when it was in the control API's shape (``NoRoute``, ``Unauthorized``;
    docs/api.md, "Error reasons"), for a program to tell refusals apart without reading the
    message; None for any other (the inference protocols' errors carry none)."""

    request_id: str | None = None
    reason: str | None = None


class NoEndpoint(EdgeplaneError):
    """The control plane knows no allowed, healthy replica for the model. ``retry_after``:
    the seconds the gateway's ``Retry-After`` asked the caller to wait, when it gave one (a
    503: replicas not ready yet, or draining)."""

    def __init__(self, message: str, retry_after: float | None = None, reason: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class Unreachable(EdgeplaneError):
    """Nothing answered: no replica the client tried, and not the gateway (connection
    refused, timed out): the address may be wrong or the control plane down."""

    def __init__(self, error: Exception | None):
        super().__init__(f"neither a replica nor the gateway answered: {error}")


class TimedOut(Unreachable):
    """A chat's answer did not come within the client's timeout: the replicas and gateways
    it tried took it all between them (an :class:`Unreachable`, as timeouts always were)."""

    def __init__(self, seconds: float, attempts: int):
        EdgeplaneError.__init__(self, f"no answer within the timeout ({seconds:g} s; attempts: {attempts})")


class PoolFull(TimedOut):
    """No connection of the client came free within its timeout: the caller ran more requests
    at once than the client has connections (``max_connections``), so this one was never
    sent. The client's own condition, not a replica's or a gateway's: none is left out of
    rotation for it, and the request goes to no other (they share the pool). ``connections``:
    the client's ``max_connections``; None for a transport the caller gave, whose pool is its own."""

    def __init__(self, seconds: float, connections: int | None):
        if connections is None:
            how = ("the transport given to the client holds its own pool: give it more connections "
                   "(httpx.HTTPTransport(limits=httpx.Limits(max_connections=N))), or send fewer requests at once")
            mine = "the connections of the transport given"
        else:
            how = f"send fewer requests at once, or give the client more: Client(..., max_connections=N), now {connections}"
            mine = f"this client's {connections} connections"
        EdgeplaneError.__init__(self, f"the client's connection pool was full: {mine} were all busy with its other requests "
                                      f"for the timeout ({seconds:g} s), so the request was not sent (no replica or gateway "
                                      f"is at fault); {how}")
        self.connections = connections


class InferenceError(EdgeplaneError):
    """A replica refused the request (4xx): retrying elsewhere would not help. ``code`` is
    the OpenAI API's error code when the refusal gave one (``context_length_exceeded``);
    ``retry_after`` the seconds its ``Retry-After`` asked the caller to wait, when it gave
    one (a replica at capacity, a gateway's rate limit: 429)."""

    def __init__(self, status: int, message: str, code: str | None = None, retry_after: float | None = None,
                 reason: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.reason = reason


class StreamCut(EdgeplaneError):
    """A generation failed after part of its text was delivered."""


class BadAnswer(EdgeplaneError):
    """The gateway answered with something that is not what the protocol says (not a v2
    inference response, not OpenAI JSON or events): the URL may lead to another service.
    Or an answer larger than the client's ``max_answer_bytes``, which it did not read."""
