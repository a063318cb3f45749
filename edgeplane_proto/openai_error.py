"""OpenAI's error object, as every part of edgeplane that speaks the OpenAI API answers it.

Why here: the gateways (``orchestrator/gateway/openai_routes.py``) and the agents' own
``/v1`` routes (``edge_agent``, which imports nothing of the control plane) answer the same
refusals, and an app reads ``type`` and ``code`` from whichever it called
(``openai.APIStatusError.body``); one table of types keeps the two from drifting apart.
"""

from __future__ import annotations

import json

#: OpenAI's error ``type`` of an HTTP status; statuses absent from it: ``server_error`` from
#: 500 up, ``invalid_request_error`` below (:func:`type_of`).
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error"}


def type_of(status: int) -> str:
    """OpenAI's error ``type`` of an answer with HTTP ``status``."""
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error object."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()
