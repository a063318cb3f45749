"""What a scoped API token lets its caller reach at the gateway (docs/security.md).

Why: a gateway open to many customers' apps (``--gateway-auth token``) needs more than "any
valid token": a token made for one tenant names the models it may call and the residency its
requests are held to. Without that, a GDPR-bound tenant's app could call another tenant's
model, or send ``X-Edgeplane-Residency`` naming a country its data must not reach.

The admission (:mod:`orchestrator.security.admission`) leaves the token it verified in the
request's ASGI scope (:data:`~orchestrator.security.admission.TOKEN_KEY`); the routes ask
here, with pure decisions, whether a model is within it and which residency binds the caller.
An unscoped token (no models, no residency) and a gateway without auth decide nothing. The
decisions and their words are :mod:`edgeplane_proto.token_scope`'s, which the agents' serving
ports (``edgeplane-agent --serve-auth token``) answer with too.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
import dataclasses
from typing import Any, Protocol

from edgeplane_proto import token_scope
from orchestrator.gateway import routing
from orchestrator.scheduler import residency as residency_mod
from orchestrator.security import admission

#: The OpenAI error codes of a scope's refusals (403, ``permission_error``).
MODEL_NOT_ALLOWED = token_scope.MODEL_NOT_ALLOWED
RESIDENCY_NOT_ALLOWED = token_scope.RESIDENCY_NOT_ALLOWED


class Scoped(Protocol):
    """A verified token's scope: the models it may call (empty: any) and the residency entries
    (ISO 3166 codes or groups such as EU; empty: none) its requests are held to."""

    @property
    def models(self) -> tuple[str, ...]: ...

    @property
    def residency(self) -> tuple[str, ...]: ...


def token_of(scope: Mapping[str, Any]) -> Scoped | None:
    """The token the admission verified for the request of ``scope`` (None: auth is off)."""
    token = scope.get(admission.TOKEN_KEY)
    return token if token is not None and (getattr(token, "models", ()) or getattr(token, "residency", ())) else None


def refused_model(token: Scoped | None, names: Iterable[str]) -> str | None:
    """Why ``token`` may not call the model a request names (``names``: the name it gave and,
    for a cascade called by its deployment's name or a LoRA adapter, what it resolves to; any
    one listed will do), or None when it may."""
    return None if token is None else token_scope.refused_model(token.models, names)


def held_residency(token: Scoped | None, asked: frozenset[str], given_as: str = token_scope.RESIDENCY_HEADER) -> frozenset[str] | str:
    """The countries a caller is held to: ``asked`` (the caller's own, empty: any) when the
    token binds none; else the token's, or ``asked`` when it lies within them (a narrower
    one). A request asking for a country outside the token's is refused (the string says why),
    not quietly answered from elsewhere than it asked."""
    if token is None or not token.residency:
        return asked
    return token_scope.held_residency(residency_mod.expand_residency(list(token.residency)), token.residency, asked, given_as)


def bound_query(token: Scoped | None, names: Iterable[str], caller: routing.Caller) -> routing.Caller | routing.NoRoute:
    """The caller of the endpoint list (``GET /v1/endpoints/{model}``, its query read as
    ``caller``) as ``token`` binds it: refused 403 for a model outside the token's (``names``
    as :func:`refused_model`'s) or a ``residency`` parameter outside its residency."""
    if (why := refused_model(token, names)) is not None:
        return routing.NoRoute(why, 403, problem="Forbidden")
    held = held_residency(token, caller.residency, "query parameter residency")
    if isinstance(held, str):
        return routing.NoRoute(held, 403, parameter="residency", problem="Forbidden")
    return dataclasses.replace(caller, residency=held)


def invalid_models(models: Any) -> str | None:
    """Why a token request's ``models`` cannot be stored (None: it can). Names need not be
    deployed yet: a token is often made before its tenant's model is applied."""
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() and len(m) <= 253 for m in models):
        return "models must be a list of model names, e.g. [\"intent\"]"
    return None


def invalid_residency(entries: Any) -> str | None:
    """Why a token request's ``residency`` cannot bind (None: it can): each entry an ISO 3166
    alpha-2 code or a known group, as a manifest's residency."""
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        return "residency must be a list of ISO 3166 alpha-2 codes or groups, e.g. [\"FR\"]"
    unknown = routing.refused_residency_code(normalised(entries))
    return None if unknown is None else f"residency: {unknown}"


def normalised(entries: Collection[str]) -> list[str]:
    return [e.strip().upper() for e in entries]


#: The header a replica that checks tokens (``Endpoint.auth`` "token") reads the caller's from.
AUTHORIZATION = "authorization"


def passed_on(scope: Mapping[str, Any]) -> dict[str, str]:
    """The caller's own ``Authorization`` to pass on to the replicas that check tokens, when
    this gateway's admission verified it (``--gateway-auth token``); none otherwise: a
    gateway without auth looks at no token (the OpenAI SDK sends one whatever it holds)."""
    if scope.get(admission.TOKEN_KEY) is None:
        return {}
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            return {AUTHORIZATION: value.decode("latin-1")}
    return {}


def anonymous(scope: Mapping[str, Any]) -> bool:
    """Whether the request has no token to pass on (:func:`passed_on`): the replicas that
    check tokens cannot answer it, and the ranking passes them over (``skips.AUTH``)."""
    return scope.get(admission.TOKEN_KEY) is None


def to_replica(headers: Mapping[str, str], e: routing.Endpoint) -> Mapping[str, str]:
    """``headers`` as sent to ``e``: the caller's ``Authorization`` only where ``e`` checks
    tokens (an agent run with ``--serve-auth token``), never to one that does not (an agent
    with ``--serve-auth none``, a data-centre replica), which has no use for the secret."""
    if e.auth == routing.AUTH_TOKEN or AUTHORIZATION not in headers:
        return headers
    return {k: v for k, v in headers.items() if k != AUTHORIZATION}
