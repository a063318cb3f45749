"""The error answers of the control API, built here and nowhere else.

An error is ``{"error": <message>, "reason": <Reason>}``, plus ``parameter`` (the query
parameter at fault) or ``field`` (the body's field at fault) where one is, and whatever a
route adds (``issues``, ``accepted``). ``error`` is for people and may be reworded in any
release; ``reason`` is for scripts and never changes: without it two 409s (a stale
``resourceVersion``, a Model still in use) or two 400s (a misspelt parameter, a bad value)
could be told apart only by their English. The Kubernetes API's ``Status.reason`` has the
same job, and its words are used where they fit.

The gateway's inference routes keep their protocols' error shapes (the Open Inference
Protocol's, OpenAI's) and are not answered from here. docs/api.md lists every reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse, Response

from orchestrator.api.reasons import Reason, reason_of
from orchestrator.gateway import routing


class BadParameter(ValueError):
    """A query parameter refused (answered 400): ``parameter`` names it where one is at fault."""

    def __init__(self, message: str, parameter: str | None = None, reason: Reason = Reason.INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.parameter, self.reason = parameter, reason


def one(names: list[str]) -> str | None:
    """The parameter to name of those at fault: the one, or none of several."""
    return names[0] if len(names) == 1 else None


def body(status: int, message: str, reason: Reason | None = None, *, field: str | None = None,
         parameter: str | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON object of an error answer with ``status``: ``reason`` defaults to the status's own."""
    doc: dict[str, Any] = {"error": message, "reason": str(reason or reason_of(status))}
    if field:
        doc["field"] = field
    if parameter:
        doc["parameter"] = parameter
    return {**doc, **extra}


def answer(status: int, message: str, reason: Reason | None = None, *, field: str | None = None, parameter: str | None = None,
           headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The error answer: :func:`body` with ``status`` and ``headers``."""
    return JSONResponse(body(status, message, reason, field=field, parameter=parameter, **extra), status_code=status, headers=headers)


def refusal(exc: BadParameter) -> JSONResponse:
    """The 400 of a query parameter refused."""
    return answer(400, str(exc), exc.reason, parameter=exc.parameter)


def no_route(refused: routing.NoRoute) -> JSONResponse:
    """The refusal of the endpoint list's query (the control plane's route, and a standalone gateway's)."""
    return answer(refused.status, refused.reason, Reason(refused.problem) if refused.problem else None, parameter=refused.parameter)


def reshaped(refused: Response) -> JSONResponse:
    """``refused``, a ``{"error": ...}`` of the gateway's own (its admission and readiness,
    which its model routes answer in the Open Inference Protocol's shape), as an error of the
    control API, for the endpoint list a standalone gateway serves as the control plane does."""
    message = json.loads(bytes(refused.body)).get("error", "")
    kept = {k: v for k, v in refused.headers.items() if k not in ("content-length", "content-type")}
    return answer(refused.status_code, str(message), headers=kept)


def encoded(status: int, message: str, reason: Reason | None = None) -> bytes:
    """:func:`body` as bytes, for what answers below Starlette (an ASGI wrapper)."""
    return json.dumps(body(status, message, reason)).encode()
