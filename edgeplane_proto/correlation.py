"""The request id that follows one caller request, and the W3C trace context passed on with it.

An operator asked about "the request of customer X that failed at 10:02" needs one token
that the caller's error, the gateway's answer, every replica the request was tried at and
the log line a replica wrote when it failed all show. ``X-Request-Id`` is that token, as
Ray Serve, the OpenAI API (and its SDK's ``request_id``) and most proxies know it: the
gateway keeps a caller's id or makes one, sends it to each replica it tries (failover
attempts keep it) and returns it on every answer; an edge agent returns the one it was
sent and names it in the log lines it writes for failed requests; the Python client sends
one per call and puts it on its errors.

Nothing stores the id: the gateway keeps no access log (docs/security.md), and neither the
gateway nor an agent logs a request that succeeded. An id is a random token, not personal
data; as one that a caller chose ends up in replicas' logs, only a short run of characters
that cannot spell a log line, a header or an e-mail address is kept
(:func:`request_id`), and anything else is replaced by the gateway and left unechoed by an
agent.

``traceparent`` and ``tracestate`` (W3C Trace Context) are passed on unchanged when they
are well formed, so a replica instrumented with OpenTelemetry joins the caller's trace; the
gateway takes no part in the trace itself (it makes no span).

Pure functions of header values: the gateway (``orchestrator.gateway.correlation``), the
agent and the client read ids through them alike.
"""

from __future__ import annotations

import os
import re

#: The request id's header, as HTTP/1.1 and ASGI servers give names: lower case.
HEADER = "x-request-id"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The longest id kept (a UUID is 36 characters, a ULID 26, the gateway's own 32).
MAX_LENGTH = 128
#: The longest ``tracestate`` passed on: the 512 characters every participant must pass on (W3C Trace Context 3.3.1.5).
MAX_TRACESTATE = 512

# Letters, digits and - _ . : + / = (UUIDs, ULIDs, hex, base64): no space, quote, comma,
# semicolon, '@' or control character, so an id cannot break a log line or spell an address.
_ID = re.compile(r"[A-Za-z0-9_.:+/=-]{1,%d}" % MAX_LENGTH)
# version-traceid-parentid-flags, lower-case hex; a later version may add fields after a '-'
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[!-~]*)?")
_TRACESTATE = re.compile(r"[ -~]{1,%d}" % MAX_TRACESTATE)  # printable ASCII; each member is the tracer's own


def request_id(value: str | None) -> str | None:
    """``value`` when it is an id to keep; None for none, or one to replace (empty, longer than
    :data:`MAX_LENGTH`, or with a character outside letters, digits and ``-_.:+/=``)."""
    return value if value is not None and _ID.fullmatch(value) else None


def new_request_id() -> str:
    """A fresh id: 128 random bits in hex, from the system's generator (unique across the
    processes of a forked server, as a seeded generator copied by the fork would not be)."""
    return os.urandom(16).hex()


def traceparent(value: str | None) -> str | None:
    """``value`` when it is a W3C ``traceparent`` to pass on: version 00 exactly as it defines
    it, or a later version's fields up to its flags followed by more; None otherwise (version
    ff, a trace or parent id of all zeros, upper-case hex, anything else)."""
    if value is None or (found := _TRACEPARENT.fullmatch(value)) is None:
        return None
    version, trace, parent, more = found.groups()
    if version == "ff" or (version == "00" and more is not None) or trace == "0" * 32 or parent == "0" * 16:
        return None
    return value


def tracestate(values: list[str]) -> str | None:
    """The ``tracestate`` to pass on with a valid ``traceparent``: the request's fields joined
    (a header may be split over several), when printable ASCII of at most :data:`MAX_TRACESTATE`
    characters; None for none or any other."""
    joined = ",".join(values)
    return joined if values and _TRACESTATE.fullmatch(joined) else None


def in_log(request: str | None) -> str:
    """What a log line about a request adds to name it: `` (request ID)``, or nothing."""
    return "" if request is None else f" (request {request})"
