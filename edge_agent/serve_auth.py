"""Who may call this agent's serving ports (``edgeplane-agent --serve-auth token``).

Why: the endpoint list hands a tenant's app the agents' own addresses (``inferUrl``), which
the Python client calls directly. With ``--serve-auth token`` those ports take the same API
tokens as a gateway run with ``--gateway-auth token``, held to the same scope (models, and
residency: a token whose residency leaves out this agent's country is refused here), and
refused in the same words and shapes (:mod:`edgeplane_proto.token_scope`).

The agent decides alone, uplink or not: the control plane sends the tokens that work with
each assignment set (their secrets' sha256 digests, scope and expiry, never a secret), and
this keeps the last list in ``<data-dir>/serve-tokens.json`` (written atomically, 0600), so
a restart without uplink checks callers against it at once. A revoked token leaves the list
on the next update; expiry is checked here, on this machine's clock. An agent that has no
list (its control plane is of a release before this, or has never been reached and nothing
was kept) refuses every call (503): it fails closed rather than serve anyone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from edge_agent import state
from edgeplane_proto import oip, openai_error, token_scope
from edgeplane_proto.agent.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

MODES = ("none", "token")
FILE_NAME = "serve-tokens.json"
FORMAT = 1
NO_LIST = ("this agent checks API tokens (--serve-auth token) and has no list of them yet: its control plane has "
           "not sent one (it may be of an earlier release, or was not reached since the agent's data dir was made); "
           "it answers no model until it has")


class Refusal(NamedTuple):
    """Why a call is refused, for each protocol to shape: ``status`` (401, 403 or 503),
    ``message``, and OpenAI's ``code`` and ``param``."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class Token:
    """One token the control plane says works, as this agent keeps it."""

    id: str
    models: tuple[str, ...]
    residency: tuple[str, ...]  # as made, for messages
    countries: frozenset[str]  # ``residency`` expanded; empty: none bound
    expires_unix_ms: int  # 0: never

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "models": list(self.models), "residency": list(self.residency),
                "countries": sorted(self.countries), "expiresUnixMs": self.expires_unix_ms}

    @classmethod
    def from_json(cls, doc: Any) -> Token:
        """The token of a kept entry; ValueError when it is not one this release wrote."""
        if not isinstance(doc, dict):
            raise ValueError(f"an entry is {type(doc).__name__}, not an object")
        words = {key: doc.get(key) for key in ("models", "residency", "countries")}
        for key, value in words.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"an entry's {key!r} is not a list of strings")
        expires = doc.get("expiresUnixMs")
        if not isinstance(doc.get("id"), str) or not isinstance(expires, int) or isinstance(expires, bool) or expires < 0:
            raise ValueError("an entry's 'id' or 'expiresUnixMs' is missing or of the wrong type")
        return cls(doc["id"], tuple(words["models"]), tuple(words["residency"]), frozenset(words["countries"]), expires)


def from_proto(msg: pb.ServeTokens) -> dict[str, Token]:
    """The tokens of ``msg``, by their secrets' digest."""
    return {t.sha256: Token(t.id, tuple(t.models), tuple(t.residency), frozenset(t.countries), t.expires_unix_ms)
            for t in msg.tokens}


def parse(raw: bytes) -> dict[str, Token]:
    """The tokens of a kept ``serve-tokens.json``; ValueError when it is not a list this
    release wrote (damaged, another ``format``, or another program's file)."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a list of format {FORMAT}")
    tokens = doc.get("tokens")
    if not isinstance(tokens, dict):
        raise ValueError("its 'tokens' is not an object")
    return {digest: Token.from_json(t) for digest, t in tokens.items()}


class ServeAuth:
    """The tokens this agent checks, and the check (:meth:`admit`)."""

    def __init__(self, data_dir: pathlib.Path, country: str, clock: Callable[[], float] = time.time) -> None:
        self._path = data_dir / FILE_NAME
        self._country = country
        self._clock = clock
        #: Why there is no list (the 503's message) while ``_tokens`` is None.
        self._why = NO_LIST
        self._tokens: dict[str, Token] | None = self._load()

    def _load(self) -> dict[str, Token] | None:
        try:
            return parse(self._path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # refused until the control plane sends a list
            self._why = (f"this agent checks API tokens (--serve-auth token) and cannot use the list kept in {self._path} "
                         f"({exc}); it answers no model until its control plane sends the list again")
            log.error("%s", self._why)
            return None

    @property
    def has_list(self) -> bool:
        return self._tokens is not None

    def update(self, msg: pb.ServeTokens | None) -> None:
        """The list a set came with (None: the control plane sent none, being of an earlier
        release: the list kept stays). Kept on disk before it is used."""
        if msg is None:
            if self._tokens is None:
                log.warning(self._why)
            return
        tokens = from_proto(msg)
        if tokens == self._tokens:
            return
        doc = {"format": FORMAT, "tokens": {d: t.to_json() for d, t in sorted(tokens.items())}}
        try:
            state.write_bytes_atomic(self._path, json.dumps(doc, indent=1).encode(), 0o600)
        except OSError as exc:  # served from memory; a restart uses the last list written
            log.error("cannot keep the API tokens in %s: %s", self._path, exc)
        self._tokens = tokens

    def admit(self, authorization: str | None, names: Iterable[str] | None) -> Refusal | None:
        """None when a call with this ``Authorization`` header may go on, to the model of
        ``names`` (the name it gave and what it resolves to; None: the call names no model),
        else why not."""
        if self._tokens is None:
            return Refusal(503, self._why, "no_token_list")
        secret = token_scope.bearer_secret(authorization)
        token = None if secret is None else self._tokens.get(hashlib.sha256(secret.encode()).hexdigest())
        if token is None or (token.expires_unix_ms and token.expires_unix_ms < self._clock() * 1000):
            return Refusal(401, token_scope.needs_token("agent"), "invalid_api_key")
        if names is not None and (why := token_scope.refused_model(token.models, names)) is not None:
            return Refusal(403, why, token_scope.MODEL_NOT_ALLOWED, "model")
        if token.countries and self._country not in token.countries:
            where = f"in {self._country}" if self._country else "of no known country (started without --country)"
            return Refusal(403, f"this agent is {where}, outside this token's residency ({','.join(token.residency)}): "
                                "call it through a gateway, which routes within it", token_scope.RESIDENCY_NOT_ALLOWED)
        return None


def http_answer(refusal: Refusal, openai: bool) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:
    """``refusal`` as an HTTP answer's status, body and headers: OpenAI's error object on the
    ``/v1`` routes (``openai``), the Open Inference Protocol's ``{"error": ...}`` elsewhere, as
    the gateway answers them."""
    if openai:
        body = openai_error.body(refusal.message, openai_error.type_of(refusal.status), refusal.param, refusal.code)
    else:
        body = oip.error_body(refusal.message)
    headers = {401: (("www-authenticate", "Bearer"),), 503: (("retry-after", "5"),)}.get(refusal.status, ())
    return refusal.status, body, headers
