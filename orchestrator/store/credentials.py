"""Tokens and agent identities: how the store makes, checks, lists, prunes and revokes API
and bootstrap tokens, and keeps each site's agent identity and its revocation.

Why apart from the rest of :class:`~orchestrator.store.sql.SqlStore`, of which this is a
part (a base class it inherits, using its hooks: ``_tx``, ``_fetch``, ``_one``, ``_q``,
``_log``, ``_fence``): who may call the API and which agent may join read as one story
here, the rule that a revoked site rejoins only on a bootstrap token made after its
revocation (ordered by the store's event sequence, not by the replicas' clocks) included.
Both backends run it as written, as they do the rest of the shared SQL.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.store.values import AgentSaved, Event, Lease, ServeTokenRow, TokenInfo, digest, new_secret, storable, token_state

#: When ``site``'s identity was last revoked (a NULL ``ts`` when it never was).
_LAST_REVOCATION = "SELECT MAX(ts) AS ts FROM events WHERE kind = 'Site' AND name = ? AND action = 'agent-revoked'"
#: The event id of ``site``'s last revocation (NULL when it never was): the cut-off for the
#: bootstrap tokens a rejoin may use, ordered by the store's own sequence, not by the clocks
#: of the replicas that stamped the token and the revocation.
_LAST_REVOCATION_ID = "SELECT MAX(id) AS id FROM events WHERE kind = 'Site' AND name = ? AND action = 'agent-revoked'"
#: The event id of token ``id``'s creation (token ids are unique: the one event of that name).
TOKEN_CREATED_ID = "SELECT MAX(id) FROM events WHERE kind = 'Token' AND action = 'token-created' AND name = {}"
#: Tokens made before the store kept ``created_seq`` take their creation event's id; one whose
#: event retention deleted keeps NULL, read as 0: made before any revocation, so it rejoins
#: no revoked site (make a new token for that).
BACKFILL_TOKEN_SEQ = "UPDATE tokens SET created_seq = (" + TOKEN_CREATED_ID.format("tokens.id") + ") WHERE created_seq IS NULL"
#: A token row with its place in the sequence as ``seq``. Looked up at read time, not only by the
#: backfill when a replica of this release starts: during a rolling update a replica of the
#: earlier release still inserts tokens without ``created_seq``, after any revocation.
_TOKEN_ROWS = "SELECT tokens.*, COALESCE(created_seq, (" + TOKEN_CREATED_ID.format("tokens.id") + "), 0) AS seq FROM tokens"


class Credentials:
    """Tokens and agent identities, as part of :class:`~orchestrator.store.sql.SqlStore`."""

    if TYPE_CHECKING:  # the store's hooks, which these operations run through
        _clock: Callable[[], float]

        def _tx(self, commit: bool = True) -> contextlib.AbstractContextManager[Any]: ...
        def _fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...
        def _one(self, db: Any, sql: str, args: Sequence[Any] = ()) -> Any: ...
        def _q(self, sql: str) -> str: ...
        def _log(self, db: Any, e: Event, now: float) -> None: ...
        def _fence(self, db: Any, lease: Lease) -> None: ...
        def _read_lock(self) -> contextlib.AbstractContextManager[Any]: ...

    def create_token(self, purpose: str, role: str, ttl_s: float | None, actor: str, description: str = "",
                     secret: str | None = None, models: Sequence[str] = (), residency: Sequence[str] = ()) -> tuple[str, TokenInfo]:
        """Returns ``(secret, info)``; only a digest of the secret is stored. ``secret``: one
        made beforehand by :func:`new_secret` (to be kept somewhere before the store has it).
        ``models`` and ``residency``: the token's scope (:class:`TokenInfo`), checked by the caller."""
        secret = secret or new_secret(purpose)
        token_id = secret.split("_", 2)[1]
        now = self._clock()
        expires = now + ttl_s if ttl_s else None
        description = storable(description)
        with self._tx() as db:
            scope = {"models": list(models), "residency": list(residency)} if models or residency else {}
            self._log(db, Event(actor, "token-created", "Token", token_id, description or f"{purpose} token",
                                {"role": role, "expiresAt": expires, **scope}), now)
            db.execute(
                self._q("INSERT INTO tokens (id, digest, purpose, role, created_at, expires_at, description, created_seq, models, residency)"
                        f" VALUES (?, ?, ?, ?, ?, ?, ?, ({TOKEN_CREATED_ID.format('?')}), ?, ?)"),
                (token_id, digest(secret), purpose, role, now, expires, description, token_id, _joined(models), _joined(residency)),
            )
            seq = int(self._one(db, "SELECT created_seq FROM tokens WHERE id = ?", (token_id,))["created_seq"])
        return secret, TokenInfo(token_id, purpose, role, expires, description, now, created_seq=seq,
                                 models=tuple(models), residency=tuple(residency))

    def verify_token(self, secret: str, purpose: str) -> TokenInfo | None:
        rows = self._fetch(self._q(_TOKEN_ROWS + " WHERE digest = ? AND purpose = ? AND NOT revoked"), (digest(secret), purpose))
        row = rows[0] if rows else None
        if row is None or (row["expires_at"] is not None and row["expires_at"] < self._clock()):
            return None
        return TokenInfo(row["id"], row["purpose"], row["role"], row["expires_at"], row["description"], row["created_at"],
                         created_seq=int(row["seq"]), models=_split(row["models"]), residency=_split(row["residency"]))

    def tokens(self) -> list[TokenInfo]:
        """Every token ever created (no secret, no digest), oldest first: revoked and expired ones too."""
        now = self._clock()
        return [TokenInfo(r["id"], r["purpose"], r["role"], r["expires_at"], r["description"], r["created_at"],
                          token_state(bool(r["revoked"]), r["expires_at"], now), int(r["seq"]), _split(r["models"]), _split(r["residency"]))
                for r in self._fetch(_TOKEN_ROWS + " ORDER BY created_at, id")]

    def serve_tokens(self) -> list[ServeTokenRow]:
        """The API tokens that work now (not revoked, not expired), with the digest of each:
        what agents that check tokens themselves (``edgeplane-agent --serve-auth token``) are
        sent, never a secret."""
        rows = self._fetch(self._q("SELECT id, digest, role, expires_at, models, residency FROM tokens WHERE purpose = 'api' "
                                   "AND NOT revoked AND (expires_at IS NULL OR expires_at >= ?) ORDER BY id"), (self._clock(),))
        return [ServeTokenRow(r["id"], r["digest"], r["role"], r["expires_at"], _split(r["models"]), _split(r["residency"])) for r in rows]

    def prune_tokens(self, before: float, limit: int = 1000, lease: Lease | None = None) -> int:
        """Delete up to ``limit`` tokens that can never work again and that the audit trail
        has forgotten: expired before ``before`` (epoch seconds, the audit retention's
        cut-off), or revoked with their revocation's event deleted by that retention.
        Returns how many went. The tokens still listed keep their place in the sequence
        (``created_seq``), and a site's revocation is never deleted (:data:`KEPT_ACTIONS`):
        which bootstrap tokens may rejoin a revoked site is unchanged. With ``lease``, only
        while it is held (:class:`Fenced`)."""
        gone = ("SELECT id FROM tokens WHERE created_at < ? AND ((expires_at IS NOT NULL AND expires_at < ?) OR (revoked AND NOT EXISTS"
                " (SELECT 1 FROM events WHERE kind = 'Token' AND name = tokens.id AND action = 'token-revoked')))"
                " ORDER BY created_at, id LIMIT ?")
        with self._tx() as db:
            if lease is not None:
                self._fence(db, lease)
            return int(db.execute(self._q(f"DELETE FROM tokens WHERE id IN ({gone})"), (before, before, max(1, limit))).rowcount)

    def revoke_token(self, token_id: str, actor: str, reason: str = "revoked") -> bool:
        """True when the token exists (and is now revoked); revoking it again logs nothing more."""
        with self._tx() as db:
            n = db.execute(self._q("UPDATE tokens SET revoked = TRUE WHERE id = ? AND NOT revoked"), (token_id,)).rowcount
            if n:
                self._log(db, Event(actor, "token-revoked", "Token", token_id, reason), self._clock())
                return True
            return self._one(db, "SELECT 1 FROM tokens WHERE id = ?", (token_id,)) is not None

    def has_api_tokens(self) -> bool:
        """Whether an API token of any role still works (not revoked, not expired)."""
        return self._has_working_api_token("")

    def has_admin_token(self) -> bool:
        """Whether an admin API token still works (not revoked, not expired)."""
        return self._has_working_api_token("AND role = 'admin' ")

    def _has_working_api_token(self, role_clause: str) -> bool:
        # as verify_token: a token that expired is refused, so it no more counts than a revoked one
        return bool(self._fetch(self._q(f"SELECT 1 FROM tokens WHERE purpose = 'api' {role_clause}AND NOT revoked "
                                        "AND (expires_at IS NULL OR expires_at >= ?) LIMIT 1"), (self._clock(),)))

    def save_agent(self, site: str, agent_id: str, credential: str, actor: str, replacing: str | None = None,
                   admitted_seq: int = 0) -> AgentSaved:
        """Give ``site`` a new agent identity, replacing its last one, unless that one is revoked
        and the join was not admitted after the revocation (``admitted_seq``: the
        :attr:`~TokenInfo.created_seq` of the bootstrap token it came with, 0 for one that always
        existed or a credential). With
        ``replacing`` (an agent id :meth:`agent_of` read, "" for none), only if the site's
        identity is still that one, not another written since, by this replica or another.
        Checked and written in one transaction: a revocation is never written over."""
        now = self._clock()
        site = storable(site)
        with self._tx() as db:
            row = self._one(db, "SELECT agent_id, revoked FROM agents WHERE site = ?", (site,))
            if row is not None and row["revoked"]:
                revoked_seq = self._one(db, _LAST_REVOCATION_ID, (site,))["id"]
                if admitted_seq <= (revoked_seq or 0):
                    return AgentSaved.REVOKED
            if replacing is not None and (row["agent_id"] if row is not None else "") != replacing:
                return AgentSaved.REPLACED
            db.execute(self._q("INSERT INTO agents (site, agent_id, credential_digest, joined_at, revoked) VALUES (?, ?, ?, ?, FALSE)"
                               " ON CONFLICT (site) DO UPDATE SET agent_id = excluded.agent_id,"
                               " credential_digest = excluded.credential_digest, joined_at = excluded.joined_at, revoked = FALSE"),
                       (site, storable(agent_id), digest(credential), now))
        return AgentSaved.SAVED

    def agent_of(self, site: str) -> str:
        """The agent id of ``site``'s current identity (revoked or not); "" when it has none."""
        rows = self._fetch(self._q("SELECT agent_id FROM agents WHERE site = ?"), (site,))
        return str(rows[0]["agent_id"]) if rows else ""

    def agent_credential_ok(self, site: str, credential: str) -> bool:
        rows = self._fetch(self._q("SELECT credential_digest, revoked FROM agents WHERE site = ?"), (site,))
        row = rows[0] if rows else None
        return bool(row) and not row["revoked"] and secrets.compare_digest(row["credential_digest"], digest(credential))

    def agent_revoked_at(self, site: str) -> float | None:
        """When the site's agent identity was revoked, or None if it is not revoked."""
        with self._read_lock():
            rows = self._fetch(self._q("SELECT revoked FROM agents WHERE site = ?"), (site,))
            if not rows or not rows[0]["revoked"]:
                return None
            ts = self._fetch(self._q(_LAST_REVOCATION), (site,))[0]["ts"]
        return float(ts) if ts is not None else 0.0

    def revoke_agent(self, site: str, actor: str, reason: str = "agent identity revoked") -> bool:
        """True when an agent joined as ``site``. Every call is logged: its event is the
        cut-off for the bootstrap tokens a rejoin may use (made before it in the store's event
        sequence), so revoking again also refuses the tokens made since the last time."""
        with self._tx() as db:
            n = db.execute(self._q("UPDATE agents SET revoked = TRUE WHERE site = ?"), (site,)).rowcount
            if n:
                self._log(db, Event(actor, "agent-revoked", "Site", site, reason), self._clock())
        return bool(n)


def _joined(names: Sequence[str]) -> str:
    """A token's list of names as its column holds it: a JSON array, "" for none (a row made
    before tokens were scoped holds "" too)."""
    return json.dumps(list(names)) if names else ""


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()
