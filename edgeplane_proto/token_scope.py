"""What a scoped API token may reach, decided the same at the gateways and at the agents.

Why here: a tenant's token (``edgeplane token create --role read --model M --residency FR``)
binds the gateways (:mod:`orchestrator.gateway.scoping`) and, with ``edgeplane-agent
--serve-auth token``, the agents' own serving ports (:mod:`edge_agent.serve_auth`), which
import nothing of the control plane. Both ask these pure decisions and answer with these
words and codes, so an app reads one refusal wherever it called (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterable

#: The OpenAI error codes of a scope's refusals (403, ``permission_error``).
MODEL_NOT_ALLOWED = "model_not_allowed"
RESIDENCY_NOT_ALLOWED = "residency_not_allowed"
#: The header a caller names its residency with.
RESIDENCY_HEADER = "X-Edgeplane-Residency"


def bearer_secret(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None for anything else."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def needs_token(server: str) -> str:
    """The 401's message of a ``server`` (``gateway``, ``agent``) that takes API tokens."""
    return f"the {server} needs 'Authorization: Bearer <token>' with a valid API token"


def refused_model(models: tuple[str, ...], names: Iterable[str]) -> str | None:
    """Why a token that may call ``models`` (empty: any) may not call the model a request
    names (``names``: the name it gave and what it resolves to, a cascade's model or a LoRA
    adapter's base; any one listed will do), or None when it may."""
    if not models:
        return None
    names = list(names)
    if any(name in models for name in names):
        return None
    return f"this token may call only models {', '.join(map(repr, models))}, not {names[0]!r}"


def held_residency(bound: frozenset[str], entries: tuple[str, ...], asked: frozenset[str],
                   given_as: str = RESIDENCY_HEADER) -> frozenset[str] | str:
    """The countries a caller is held to when its token's residency ``entries`` (as made:
    codes or groups) expand to the countries ``bound`` (empty: it binds none): ``asked`` (the
    caller's own, empty: any) when the token binds none; else the token's, or ``asked`` when
    it lies within them (a narrower one). A request asking for a country outside the token's
    is refused (the string says why), not quietly answered from elsewhere than it asked."""
    if not bound:
        return asked
    if not asked:
        return bound
    if asked <= bound:
        return asked
    own = ",".join(entries)
    return (f"{given_as} names {', '.join(sorted(asked - bound))}, outside this token's residency ({own}): "
            f"leave it out, or name countries within {own}")
