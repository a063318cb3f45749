"""Who may use the gateway, and how fast: bearer tokens (optional) and per-client rates.

The gateway calls :meth:`GatewayAdmission.check` before routing a model request; a
``Response`` back means "answer this instead" (401, 429 with ``Retry-After``, or 503 with
``Retry-After`` when whatever holds the tokens cannot say: the verifier raises
:class:`TokenCheckUnavailable`). The
client key of the rate limit is the token's id when the caller presents a valid token,
else its peer address: behind a proxy every caller shares the proxy's address, so put the
limit on tokens there.

With tokens required, a request whose token is not known valid (none, a guess, one not
checked yet or refused) first takes from its address's bucket, and only then is its token
looked up: checked after the lookup, a client sending a new made-up token each time would
never be limited, and each of its guesses would cost a store lookup (on a standalone gateway,
a call to the control plane). A token known valid (:attr:`GatewayAdmission.known`, which asks
nothing) skips the address, so clients behind one proxy are limited by their tokens alone.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response

from edgeplane_proto import oip, token_scope
from orchestrator.security import bearer, ratelimit


#: Where :meth:`GatewayAdmission.check` leaves the token it verified in the request's ASGI
#: scope, for the routes to read its scope (:mod:`orchestrator.gateway.scoping`).
TOKEN_KEY = "edgeplane.token"

#: The longest ``Retry-After`` the rate limit gives: a client told to come back in more than a
#: day is refused in effect, and a header of a number that long helps no one.
RETRY_AFTER_MAX_S = 86_400


class TokenCheckUnavailable(Exception):
    """Nothing could say whether a token is valid now (the store that holds them does not answer)."""


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(oip.error_body(message), status_code=status, media_type="application/json", headers=headers)


class VerifiedToken(Protocol):
    """A valid token, as the store (or a standalone gateway's cache) knows it."""

    @property
    def id(self) -> str: ...

    @property
    def models(self) -> tuple[str, ...]: ...

    @property
    def residency(self) -> tuple[str, ...]: ...


class GatewayAdmission:
    def __init__(self, limiter: ratelimit.RateLimiter,
                 verify_token: Callable[[str], Awaitable[VerifiedToken | None]] | None = None,
                 known_token: Callable[[str], VerifiedToken | None] | None = None) -> None:
        """``verify_token`` set = every model request needs a valid API token (any role); it
        must not block the event loop (a store lookup runs in a worker thread, its verdict kept).
        ``known_token``: the token when a verdict already kept says it is valid, without asking
        (None: every token is taken for one that needs a lookup)."""
        self.limiter = limiter
        self._verify = verify_token
        self.known = known_token or (lambda secret: None)

    async def check(self, request: Request) -> Response | None:
        address = f"addr:{request.client.host if request.client else '?'}"
        if self._verify is None:
            return self._take(address)
        secret = bearer.bearer_secret(request.headers.get("authorization"))
        if secret is None or self.known(secret) is None:  # a lookup, or a refusal: paid by the address first
            if (limited := self._take(address)) is not None:
                return limited
        try:
            info = await self._verify(secret) if secret is not None else None
        except TokenCheckUnavailable as exc:
            return _refuse(503, f"cannot check the API token now: {exc}; retry", {"retry-after": "2"})
        if info is None:
            return _refuse(401, token_scope.needs_token("gateway"),
                           {"www-authenticate": "Bearer"})
        request.scope[TOKEN_KEY] = info  # its scope binds the route (orchestrator.gateway.scoping)
        return self._take(f"token:{info.id}")

    def _take(self, key: str) -> Response | None:
        wait = self.limiter.take(key)
        if wait is not None:
            return _refuse(429, f"rate limit of {self.limiter.limit.rate:g} requests/s exceeded; retry later",
                           {"retry-after": str(max(1, math.ceil(min(wait, RETRY_AFTER_MAX_S))))})
        return None
