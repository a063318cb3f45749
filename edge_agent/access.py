"""The agent's access line (``--access-log``, off by default): which route of the agent's
fixed API a request took, so that the line names its template and model (one the agent is assigned:
``logformat.AccessLog``) and never its path as sent (a path no route has may hold anything: docs/security.md). The line itself is
``edgeplane_proto.logformat``'s, shared with the gateway; ``edge_agent.httpserver`` writes
it once an answer is written."""

from __future__ import annotations

import time

from edge_agent import refusals
from edge_agent.httpmessages import Request
from edgeplane_proto import logformat

#: The routes without a parameter (``edge_agent.http``, ``edge_agent.generation``).
FIXED = frozenset(("/v2/health/live", "/v2/health/ready", "/v2", "/metrics", "/v1", "/v1/models", *refusals.GENERATE_PATHS))
_V2_ACTIONS = {(): "", ("ready",): "/ready", ("infer",): "/infer"}


def route_of(path: str) -> tuple[str | None, str | None]:
    """The template of the route ``path`` takes and the model it names: (None, None) for a path
    no route has. As ``edge_agent.http`` dispatches: ``/v2/models/{model}[/versions/{version}][/ready|/infer]``."""
    if path in FIXED:
        return path, None
    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return "/v1/models/{model}", path[len("/v1/models/"):]
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        rest, template = parts[4:], "/v2/models/{model}"
        if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
            rest, template = rest[2:], template + "/versions/{version}"
        action = _V2_ACTIONS.get(tuple(rest))
        if action is not None:
            return template + action, parts[3]
    return None, None


def log(access: logformat.AccessLog, request: Request, request_id: str | None, status: int | None, bytes_out: int, started: float) -> None:
    """``request``'s access line: answered ``status`` (None: no answer was written) with
    ``bytes_out`` of body, ``started`` at ``time.perf_counter()``."""
    route, model = route_of(request.path)
    access.write(request_id, request.method, route, model, None, status, len(request.body), bytes_out,
                 (time.perf_counter() - started) * 1000)
