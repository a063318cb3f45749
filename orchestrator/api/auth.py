"""Bearer-token roles for the control API.

Two roles: ``read`` (GET) and ``admin`` (everything). Tokens live hashed in the store;
the admin token that ``edgeplane serve`` writes on first start is one of them. With auth
off (the loopback-only default), every caller is ``anonymous`` with admin rights; the
server refuses to start on a non-loopback address in that mode.

What the store says when it fails (a PostgreSQL store names its database's host) is for the
control plane's log and its admins: a caller whose token could not be checked, or one with a
read token, is told only to retry (:func:`store_refusal`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

from orchestrator import durable, logthrottle
from orchestrator.api import problems
from orchestrator.security import tokencache
from orchestrator.security.bearer import bearer_secret
from orchestrator.store import sqlite as store_mod

__all__ = ["ROLES", "Authenticator", "Caller", "Unauthorized", "bearer_secret", "ensure_admin_token", "is_loopback", "store_refusal",
           "unauthorized"]

log = logging.getLogger(__name__)

ROLES = ("read", "admin")

#: What a caller who is not an admin is told of a store that does not answer for now, or that failed.
STORE_UNAVAILABLE = "the control plane's store does not answer for now; retry later"
STORE_FAILED = "the control plane's store failed; the control plane's log says why"
TOKEN_NEEDED = "this API needs 'Authorization: Bearer <token>' (see 'edgeplane token create')"
TOKEN_REFUSED = "the bearer token is unknown, revoked or expired"
#: Why a scoped token (an app's credential, docs/security.md) is refused every control-API route
#: but its own: it is made to call its models, and the control API would show it every tenant's.
SCOPED_REFUSED = ("a scoped token (models, residency) calls models at the gateway and reads nothing of the control API "
                  "but GET /v1/whoami and GET /v1/endpoints/{model} for its own models; use an unscoped token here")
#: How often one failure of the token store, the same each time, is logged again while it lasts.
STORE_ERROR_LOG_S = 60.0


@dataclass(frozen=True)
class Caller:
    identity: str
    role: str
    models: tuple[str, ...] = ()  # its token's scope (orchestrator.gateway.scoping): empty, any model
    residency: tuple[str, ...] = ()

    def may_write(self) -> bool:
        return self.role == "admin"

    def scoped(self) -> bool:
        return bool(self.models or self.residency)


class Unauthorized(Exception):
    def __init__(self, message: str, token_given: bool) -> None:
        super().__init__(message)
        self.token_given = token_given


#: The scheme a 401 names (RFC 9110 §11.6.1: a 401 carries ``WWW-Authenticate``), and RFC 6750's
#: ``invalid_token`` when a token was given and refused (unknown, revoked, expired).
CHALLENGE = 'Bearer realm="edgeplane"'
CHALLENGE_REFUSED = f'{CHALLENGE}, error="invalid_token"'


def unauthorized(message: str, token_given: bool) -> JSONResponse:
    """The 401 of the control API: the error, and ``WWW-Authenticate`` saying how to authenticate."""
    return problems.answer(401, message, headers={"www-authenticate": CHALLENGE_REFUSED if token_given else CHALLENGE})


def store_refusal(exc: store_mod.StoreError, caller: Caller | None, request: Request | None = None) -> JSONResponse:
    """The answer to a request the store failed: 503 with Retry-After while it does not answer
    for now (:class:`StoreUnavailable`: the database unreachable, read-only or full), else 500
    (a retry gets the same). What the store said goes to an admin ``caller`` only; anyone else
    (no caller: a token not checked yet) is told :data:`STORE_UNAVAILABLE` or
    :data:`STORE_FAILED`. With the route's ``request``, the log says what the store said where
    the caller is not told it, and every failure that is no passing one; without it the
    failure is logged already (a token's lookup logs its own: ``Authenticator.verify``)."""
    unavailable = isinstance(exc, store_mod.StoreUnavailable)
    admin = caller is not None and caller.may_write()
    if request is not None:
        if not unavailable:  # refused for what it is (a constraint, a bug): a retry gets the same
            log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        elif not admin:  # told only to retry
            who = caller.identity if caller is not None else "a caller not known yet"
            log.warning("%s %s by %s: %s", request.method, request.url.path, who, exc)
    message = str(exc) if admin else STORE_UNAVAILABLE if unavailable else STORE_FAILED
    return problems.answer(503 if unavailable else 500, message, headers={"retry-after": "2"} if unavailable else None)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Who a request's bearer token is. The store is asked off the event loop and its verdicts
    kept a few seconds (:mod:`orchestrator.security.tokencache`); :meth:`forget_tokens` after a
    revocation makes this process refuse the token at once."""

    def __init__(self, store: store_mod.Store, required: bool, *, ttl_s: float = tokencache.TTL_S,
                 wall: Callable[[], float] = time.time) -> None:
        """``wall``: the clock the store's token expiries are on."""
        self.store, self.required = store, required
        self.tokens: tokencache.TokenVerdicts[store_mod.TokenInfo] = tokencache.TokenVerdicts(
            lambda secret: self.store.run(self.store.verify_token, secret, "api"), ttl_s=ttl_s, wall=wall)
        # once per failure and minute, not per request: a flood of callers while the store is down would flood the log
        self._store_errors = logthrottle.Throttle(STORE_ERROR_LOG_S)

    async def verify(self, secret: str) -> store_mod.TokenInfo | None:
        """The API token ``secret`` when valid, else None; StoreError when the store does not
        answer, logged here: the callers it refuses are not told what the store said."""
        try:
            return await self.tokens.verify(secret)
        except store_mod.StoreError as exc:
            if self._store_errors.due(said := str(exc)) is not None:
                log.warning("cannot check API tokens: %s", said)
            raise

    def forget_tokens(self) -> None:
        """A token was revoked: every kept verdict goes stale, so this process refuses it at once."""
        self.tokens.forget()

    async def caller(self, authorization: str | None) -> Caller:
        secret = bearer_secret(authorization)
        if secret is not None:
            info = await self.verify(secret)
            if info is None:
                raise Unauthorized(TOKEN_REFUSED, token_given=True)
            return Caller(f"token:{info.id}" + (f" ({info.description})" if info.description else ""), info.role,
                          info.models, info.residency)
        if self.required:
            raise Unauthorized(TOKEN_NEEDED, token_given=False)
        return Caller("anonymous", "admin")

    async def still_valid(self, authorization: str | None) -> bool:
        """For a stream admitted earlier: False once its token no longer verifies (revoked or
        expired since). A stream admitted without a token (auth off) stays valid, and so does
        a token while the store cannot answer: it was valid, and nothing says it is not."""
        secret = bearer_secret(authorization)
        if secret is None:
            return True
        try:
            return await self.verify(secret) is not None
        except store_mod.StoreError:
            return True

    async def admit(self, request: Request, *, write: bool = False, needs: str = "this needs 'admin'",
                    scoped: bool = False) -> Caller | JSONResponse:
        """The caller of ``request``, or the answer that refuses it: 400 for a path or query
        holding a NUL character (no name holds one, and PostgreSQL cannot store one: it
        would reach the store as a lookup or an event's name), 401 without a valid token,
        403 for a scoped token unless the route takes one (``scoped``: it binds the scope
        itself) or for a ``write`` by a caller who may not (``needs`` says what it takes), 503 with
        Retry-After when the store that holds the tokens does not answer for now, 500 when it
        refuses the lookup for what it is (as the API answers the store's errors), neither
        saying what the store said (:func:`store_refusal`)."""
        if "\x00" in request.scope["path"] or b"%00" in request.scope.get("query_string", b""):
            return problems.answer(400, "the request's path or query holds a NUL character, which no name or value here may hold")
        try:
            caller = await self.caller(request.headers.get("authorization"))
        except Unauthorized as exc:
            return unauthorized(str(exc), exc.token_given)
        except store_mod.StoreError as exc:  # 503 for a store that does not answer for now; logged by verify
            return store_refusal(exc, None)
        if caller.scoped() and not scoped:
            return problems.answer(403, f"{caller.identity}: {SCOPED_REFUSED}", problems.Reason.FORBIDDEN)
        if write and not caller.may_write():
            return problems.answer(403, f"{caller.identity} has role {caller.role!r}; {needs}")
        return caller


def ensure_admin_token(store: store_mod.Store, data_dir: pathlib.Path) -> str | None:
    """The initial admin token, written to ``<data_dir>/admin.token``: only while the store
    holds no admin token that works, so a start that failed before this (a port in use)
    leaves neither the file nor a token, and a later start never rewrites the file operators
    use while its token works. One whose admin tokens have all expired or been revoked (a
    restore brings back expired ones too) writes a new one: else nobody could administer it
    again. The file is written before the store has the token: a start that fails between
    the two (a full disk, a kill) leaves a file whose token the next start replaces, never a
    token nobody holds (with which no start would write the file again). Returns the secret
    it made (None: an admin token works)."""
    if store.has_admin_token():
        return None
    secret = store_mod.new_secret("api")
    path = data_dir / "admin.token"
    # a new file, 0600 from its creation, renamed over any old one: opening an existing
    # admin.token (a store reset beside it) would keep its mode, maybe readable by all
    fresh = path.with_name(f".admin.token.{os.getpid()}")
    fresh.unlink(missing_ok=True)
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the store has the token
        os.replace(fresh, path)
        durable.sync_folder(data_dir)  # its name too: a power cut must not leave the old file, or none, with the new token stored
    except BaseException:
        fresh.unlink(missing_ok=True)  # not a secret left about
        raise
    store.create_token("api", "admin", None, "edgeplane serve", "initial admin token", secret=secret)
    log.info("wrote the initial admin token to %s", path)
    return secret
