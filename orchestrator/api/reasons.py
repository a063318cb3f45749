"""The ``reason`` words of the control API's errors (docs/api.md, "Error reasons"), with the
status each is answered with: apart from :mod:`orchestrator.api.problems`, which builds the
answers with Starlette, so that the CLI reads them without importing a web framework.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Reason(enum.StrEnum):
    """Why a request was refused; :attr:`status` is the HTTP status it is answered with."""

    BAD_REQUEST = "BadRequest"
    UNKNOWN_PARAMETER = "UnknownParameter"
    REPEATED_PARAMETER = "RepeatedParameter"
    INVALID_PARAMETER = "InvalidParameter"
    UNAUTHORIZED = "Unauthorized"
    FORBIDDEN = "Forbidden"
    NOT_FOUND = "NotFound"
    NO_ROUTE = "NoRoute"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    CONFLICT = "Conflict"
    IN_USE = "InUse"
    ALREADY_RUNNING = "AlreadyRunning"
    NOT_DISTILLABLE = "NotDistillable"
    UNREADABLE = "Unreadable"
    REQUEST_ENTITY_TOO_LARGE = "RequestEntityTooLarge"
    UNSUPPORTED_MEDIA_TYPE = "UnsupportedMediaType"
    RANGE_NOT_SATISFIABLE = "RangeNotSatisfiable"
    INVALID = "Invalid"
    TOO_MANY_REQUESTS = "TooManyRequests"
    REQUEST_HEADER_FIELDS_TOO_LARGE = "RequestHeaderFieldsTooLarge"
    INTERNAL_ERROR = "InternalError"
    SERVICE_UNAVAILABLE = "ServiceUnavailable"

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS: Mapping[Reason, int] = {
    Reason.BAD_REQUEST: 400, Reason.UNKNOWN_PARAMETER: 400, Reason.REPEATED_PARAMETER: 400, Reason.INVALID_PARAMETER: 400,
    Reason.UNAUTHORIZED: 401, Reason.FORBIDDEN: 403, Reason.NOT_FOUND: 404, Reason.NO_ROUTE: 404, Reason.METHOD_NOT_ALLOWED: 405,
    Reason.CONFLICT: 409, Reason.IN_USE: 409, Reason.ALREADY_RUNNING: 409, Reason.NOT_DISTILLABLE: 409, Reason.UNREADABLE: 409,
    Reason.REQUEST_ENTITY_TOO_LARGE: 413, Reason.UNSUPPORTED_MEDIA_TYPE: 415, Reason.RANGE_NOT_SATISFIABLE: 416, Reason.INVALID: 422,
    Reason.TOO_MANY_REQUESTS: 429, Reason.REQUEST_HEADER_FIELDS_TOO_LARGE: 431,
    Reason.INTERNAL_ERROR: 500, Reason.SERVICE_UNAVAILABLE: 503,
}

#: The reason of a status when the answer names none more precise (the first of each status).
_BY_STATUS: Mapping[int, Reason] = {status: reason for reason, status in reversed(list(_STATUS.items()))}


def reason_of(status: int) -> Reason:
    """The general reason of ``status`` (one no route names: a 4xx is a BadRequest, else an InternalError)."""
    return _BY_STATUS.get(status) or (Reason.BAD_REQUEST if status < 500 else Reason.INTERNAL_ERROR)
