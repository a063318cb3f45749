"""Proving who an agent is, for a join or a stream, and issuing a joining agent its identity.

Why apart from the hub: the hub's inventory is touched only on its event loop and costs O(1)
a heartbeat, while every call here goes to the :class:`~orchestrator.agents.auth.JoinAuthenticator`,
which on the control plane's store may wait on the database. So the checks run in worker
threads (several joins at once), and what a join proved is handed back as a :class:`Proof`
rather than kept. Two pieces of state live here, on the hub's loop. The hold of a site while
a join's new credential is written: it must outlive the hub's own decision, and the hub asks
it before letting another agent have the site (:meth:`Identities.refuse_if_joining`), so a
join refused meanwhile never replaces the holder's credential. And each site's count of
revocations: a check made in a worker thread may pass just before the site is revoked, so
what it proved counts only while no revocation came since it began
(:meth:`Identities.refuse_if_revoked_since`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from orchestrator.agents import auth, errors, model

#: How long another agent is told to wait for a site whose join is being written: by then
#: that agent holds it, or its join failed.
JOINING_RETRY_S = 1.0


@dataclass(frozen=True)
class Proof:
    """What a join proved itself with: the site's credential, or a bootstrap token."""

    by_credential: bool
    token: auth.BootstrapToken | None
    replacing: str = ""  # the agent id the site's credential was for when the join was checked
    revocations: int = 0  # the site's revocations on the hub's loop before the check began


@dataclass
class _Joining:
    """A join given a new identity, while its credential is written to the store."""

    agent_id: str


class Identities:
    """The authenticator's checks, the sites held while a join's credential is written, and
    the sites' revocations.

    Held sites and revocations are read and changed on the hub's event loop only; the
    authenticator alone is called from worker threads.
    """

    def __init__(self, authenticator: auth.JoinAuthenticator) -> None:
        self._auth = authenticator
        self._joining: dict[str, _Joining] = {}  # site -> the join whose credential is being issued
        self._revocations: dict[str, int] = {}  # site -> how many times it was revoked (:meth:`revoked`)

    def prove(self, application: model.JoinApplication) -> Proof:
        """Check the join's credential, or else its bootstrap token, on the caller's thread:
        for an authenticator that does not block."""
        return self._prove(application, self.revocations(application.site))

    async def prove_off_loop(self, application: model.JoinApplication,
                             bootstrap: auth.BootstrapToken | None = None) -> Proof:
        """:meth:`prove` in a worker thread; the site's revocations are counted first, on the loop.
        ``bootstrap`` is the application's token when :meth:`check_enrolment` already verified it."""
        return await self._auth.run(self._prove, application, self.revocations(application.site), bootstrap)

    def _prove(self, application: model.JoinApplication, revocations: int,
               bootstrap: auth.BootstrapToken | None = None) -> Proof:
        """The authenticator alone: safe from a worker thread."""
        site = application.site
        replacing = self._auth.holder_of(site)  # read first: a credential written after it is not replaced
        if application.credential is not None and self._auth.verify_credential(site, application.credential):
            return Proof(by_credential=True, token=None, replacing=replacing, revocations=revocations)
        token = bootstrap if bootstrap is not None else self._auth.verify_bootstrap(application.bootstrap_token)
        if token is None:
            raise errors.NotAuthenticated(f"join for site {site!r} refused: invalid token or credential")
        return Proof(by_credential=False, token=token, replacing=replacing, revocations=revocations)

    def issue(self, site: str, proof: Proof) -> tuple[str, str]:
        """A new agent id for ``site`` and its credential, on the caller's thread."""
        agent_id = _new_agent_id()
        return agent_id, self._auth.issue_credential(site, agent_id, proof.token, proof.replacing)

    async def issue_held(self, site: str, proof: Proof) -> tuple[str, str]:
        """:meth:`issue` with the credential written in a worker thread, ``site`` held for this
        join until then (from the call on, before it first waits). NotAuthenticated when the
        site was revoked since ``proof`` began (:meth:`refuse_if_revoked_since`): its credential
        may have been written first."""
        joining = self._joining[site] = _Joining(_new_agent_id())
        try:
            credential = await self._auth.run(self._auth.issue_credential, site, joining.agent_id, proof.token,
                                              proof.replacing)
        finally:
            if self._joining.get(site) is joining:
                del self._joining[site]
        self.refuse_if_revoked_since(site, proof.revocations)
        return joining.agent_id, credential

    def refuse_if_joining(self, site: str, agent_id: str | None) -> None:
        """SiteTaken while another agent's join holds ``site`` (:meth:`issue_held`)."""
        joining = self._joining.get(site)
        if joining is not None and joining.agent_id != agent_id:
            raise errors.SiteTaken(f"site {site!r} is being joined by agent {joining.agent_id}",
                                   holder=joining.agent_id, retry_after_s=JOINING_RETRY_S)

    def revoked(self, site: str) -> None:
        """``site``'s identity was revoked: every join or stream open whose check began before
        is refused, whatever the check found (a credential revoked just after it was read, a
        bootstrap token's new credential written just before the revocation)."""
        self._revocations[site] = self._revocations.get(site, 0) + 1

    def revocations(self, site: str) -> int:
        """How many times ``site`` was revoked here: read it before a check, on the loop, and
        give it to :meth:`refuse_if_revoked_since` after."""
        return self._revocations.get(site, 0)

    def refuse_if_revoked_since(self, site: str, revocations: int) -> None:
        """NotAuthenticated when ``site`` was revoked after :meth:`revocations` said ``revocations``."""
        if self._revocations.get(site, 0) != revocations:
            raise errors.NotAuthenticated(f"site {site!r} was revoked while this agent was checked; it joins again only "
                                          "with a bootstrap token created after the revocation")

    async def check_enrolment(self, site: str, bootstrap_token: str) -> auth.BootstrapToken:
        """A client certificate asked for without one (the join port) is for a valid bootstrap
        token only: the site's credential never expires, so a copy of it must not mint
        certificates; renewal goes over mutual TLS, with the certificate it renews. The verified
        token is given back for the join to prove itself with (:meth:`prove_off_loop`)."""
        token = await self._auth.run(self._auth.verify_bootstrap, bootstrap_token)
        if token is None:
            raise errors.NotAuthenticated(
                f"no client certificate for site {site!r}: the join port issues one only for a valid bootstrap token, and this "
                "one is unknown, expired or revoked (a certificate is renewed over mutual TLS with the current one)")
        return token

    async def check_credential(self, site: str, credential: str) -> None:
        """NotAuthenticated unless ``credential`` is ``site``'s (checked in a worker thread) and
        the site was not revoked meanwhile."""
        revocations = self.revocations(site)
        if not await self._auth.run(self._auth.verify_credential, site, credential):
            raise errors.NotAuthenticated(f"invalid credential for site {site!r}")
        self.refuse_if_revoked_since(site, revocations)


def _new_agent_id() -> str:
    return "agt-" + secrets.token_hex(8)
