"""Who may join, and the per-agent credential it gets.

The hub only sees the :class:`JoinAuthenticator` protocol. The control plane backs it with
its store (:class:`StoreJoinAuthenticator`: hashed bootstrap tokens, revocable
credentials); tests and the demo's in-process hubs with :class:`InMemoryJoinAuthenticator`.
The store-backed one blocks on the database: the hub calls it from worker threads, several
joins at once, so what a join proved is handed back to it (:class:`BootstrapToken`) rather
than remembered between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

from orchestrator.agents import errors as agent_errors
from orchestrator.store import sqlite as store_mod

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class BootstrapToken:
    """A bootstrap token a join was accepted with: ``created_seq`` is where the store's
    sequence stood when it was made, 0 for one that has always existed (a static
    ``--bootstrap-token``, an in-memory one)."""

    created_seq: int = 0


class JoinAuthenticator(Protocol):
    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``, which calls this authenticator, off the event loop: on the
        threads of the store it reads, when it has one."""
        ...

    def verify_bootstrap(self, token: str) -> BootstrapToken | None: ...

    def holder_of(self, site: str) -> str:
        """The agent id ``site``'s credential is for ("" for none): a join that is to replace it
        reads it first, and gives it back to :meth:`issue_credential`."""
        ...

    def issue_credential(self, site: str, agent_id: str, token: BootstrapToken | None, replacing: str | None = None) -> str:
        """A new credential for ``site``, replacing its last one; ``token``: the bootstrap
        token the join was accepted with, None for one that came with the site's credential.
        With ``replacing`` (:meth:`holder_of`), SiteTaken unless the site's credential is still
        that agent's: replicas sharing the store never replace one another's new credential.
        NotAuthenticated when the site is revoked and ``token`` is not newer than the revocation."""
        ...

    def verify_credential(self, site: str, credential: str) -> bool: ...


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class InMemoryJoinAuthenticator:
    """Bootstrap tokens and credentials held in memory (hashed); for tests and the demo."""

    def __init__(self, bootstrap_tokens: Iterable[str]) -> None:
        self._tokens = [_digest(t) for t in bootstrap_tokens if t]
        self._credentials: dict[str, tuple[str, bytes]] = {}  # site -> (agent id, credential digest)

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def verify_bootstrap(self, token: str) -> BootstrapToken | None:
        if not token:
            return None
        probe = _digest(token)
        # No early exit: every comparison runs, each in constant time.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(probe, known)
        return BootstrapToken() if matched else None

    def holder_of(self, site: str) -> str:
        return self._credentials.get(site, ("", b""))[0]

    def issue_credential(self, site: str, agent_id: str, token: BootstrapToken | None, replacing: str | None = None) -> str:
        if replacing is not None and self.holder_of(site) != replacing:
            raise _replaced(site)
        credential = secrets.token_urlsafe(32)
        self._credentials[site] = (agent_id, _digest(credential))
        return credential

    def verify_credential(self, site: str, credential: str) -> bool:
        known = self._credentials.get(site)
        return bool(credential) and known is not None and hmac.compare_digest(
            _digest(credential), known[1]
        )


class StoreJoinAuthenticator:
    """Agent joins checked against the store: bootstrap tokens, per-site credentials.

    A revoked site stays refused for bootstrap tokens that existed when it was revoked
    (static ``--bootstrap-token`` ones included): an admin re-admits it by creating a new
    token. Every call reads or writes the database and may wait on it: call it off the event
    loop.
    """

    def __init__(self, store: store_mod.Store, static_tokens: tuple[str, ...] = ()):
        self.store = store
        self._static = {store_mod.digest(t) for t in static_tokens if t}

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.store.run(fn, *args, **kwargs)  # every check reads the store: on its threads

    def verify_bootstrap(self, token: str) -> BootstrapToken | None:
        if not token:
            return None
        if store_mod.digest(token) in self._static:
            return BootstrapToken()
        with _store_in_use():
            info = self.store.verify_token(token, "bootstrap")
        return BootstrapToken(info.created_seq) if info is not None else None

    def holder_of(self, site: str) -> str:
        with _store_in_use():
            return self.store.agent_of(site)

    def issue_credential(self, site: str, agent_id: str, token: BootstrapToken | None, replacing: str | None = None) -> str:
        # a join by credential counts as admitted before any revocation: one revoked since it was checked is refused
        admitted_seq = token.created_seq if token is not None else 0
        credential = secrets.token_urlsafe(32)
        with _store_in_use():  # the revocation checked in the write's own transaction: one landing between is never undone
            saved = self.store.save_agent(site, agent_id, credential, f"agent@{site}", replacing, admitted_seq)
        if saved is store_mod.AgentSaved.REVOKED:
            raise agent_errors.NotAuthenticated(f"site {site!r} was revoked; join it with a bootstrap token created after the revocation")
        if saved is store_mod.AgentSaved.REPLACED:
            raise _replaced(site)
        return credential

    def verify_credential(self, site: str, credential: str) -> bool:
        with _store_in_use():
            return self.store.agent_credential_ok(site, credential)


#: How long a join whose site was given to another agent meanwhile is told to wait: by then
#: that agent holds the site (and the join is refused for it), or it failed.
REPLACED_RETRY_S = 1.0


def _replaced(site: str) -> agent_errors.SiteTaken:
    return agent_errors.SiteTaken(f"site {site!r} was given to another agent while this join was checked",
                                  retry_after_s=REPLACED_RETRY_S)


@contextlib.contextmanager
def _store_in_use() -> Iterator[None]:
    """A store that cannot be read or written (unreachable, a full disk): the agent is told
    to retry (UNAVAILABLE), not refused."""
    try:
        yield
    except store_mod.StoreError as exc:
        raise agent_errors.Unavailable(f"the control plane cannot check this join now: {exc}") from None
