"""When the agent's client certificate is due for renewal, and what a renewal that failed waits.

Under mutual TLS the agent's certificate runs out while sessions come and go, and the uplink
(:mod:`edge_agent.uplink`) must neither outlive it nor spend a key on every reconnect. A
:class:`Renewal` keeps that clock for one uplink: the certificate's dates (read once, by the
identity tool, then after each renewal), the key and CSR the next join (or enrolment) carries
until one is accepted, when to ask again after a refusal or a failing tool, and when a long session must
end so that its next join renews. The uplink owns the connection and the join; this module
decides only when, and keeps what came back. It knows nothing of gRPC beyond the answer's
certificate fields.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from edge_agent import errors, outage, tls
from edgeplane_proto.agent.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

RENEW_RETRY_S = 3600.0  # after a renewal that failed, at most (renewal_retry)
RENEW_RETRY_MIN_S = 10.0
DATES_RETRY_S = 300.0  # after the certificate's dates could not be read: how long it has left is unknown
RENEW_MIN_GAP_S = 60.0  # between sessions ended for a renewal


def renewal_retry(left: float | None) -> float:
    """How long after a failed renewal to ask again, given what is left of the certificate
    (None: its dates could not be read). An hour, or a quarter of what is left when that is
    sooner (RENEW_RETRY_MIN_S at least), so that a short-lived certificate, or one whose agent
    was offline through most of its renewal window, gets several tries before it expires:
    an expired one can only be replaced by enrolling again with a valid bootstrap token."""
    if left is None:
        return DATES_RETRY_S
    return min(RENEW_RETRY_S, max(RENEW_RETRY_MIN_S, left / 4))


class Renewal:
    """The renewal clock of one agent's client certificate (``agent_tls``), for site ``site``;
    ``clock``: the wall clock, against which the certificate is dated."""

    def __init__(self, agent_tls: tls.AgentTls, site: str, clock: Callable[[], float]) -> None:
        self._tls = agent_tls
        self._site = site
        self._clock = clock
        self._renew_at: float | None = None  # when the client certificate is due
        self._expires: float | None = None
        self._pending_csr: tuple[bytes, bytes] | None = None  # (key, CSR) not yet accepted
        self._renewed_at: float | None = None  # when a session last ended for a renewal
        self._token_refused = False  # the join port refused the bootstrap token (lapsed)
        self._expiry_said = outage.Reminder()  # the expired certificate's line (lapsed)

    async def check(self, bootstrap_token: str) -> None:
        """A damaged key or certificate (or a key that is not the certificate's) would fail
        every TLS handshake: it is set aside and the agent enrols again with its bootstrap
        token; without one, it says what to do. Read once per certificate (:meth:`schedule`)."""
        if self._renew_at is not None:
            return  # this certificate was read already
        try:
            await self.schedule()
        except errors.CertificateUnusable as exc:
            if not bootstrap_token:
                raise errors.CertificateUnusable(f"{exc}: this agent must enrol again: restart it with a bootstrap "
                                                 "token (--token)") from None
            kept = self._tls.set_aside()
            log.error("%s: set aside as %s; enrolling again with the bootstrap token", exc, ", ".join(p.name for p in kept))
        except (OSError, errors.AgentError):
            pass  # the tool itself failed (a timeout on a loaded machine): the handshake will tell

    @property
    def expires(self) -> float | None:
        """When the certificate expires (None until its dates were read)."""
        return self._expires

    def forget(self) -> None:
        """A new certificate was saved (an enrolment) with the pending key: its dates are read
        at the next join, and the next renewal makes a new key."""
        self._pending_csr = None
        self._renew_at = self._expires = None

    async def schedule(self) -> float:
        """When the certificate is due (read once, then after each renewal), or, while its
        dates could not be read, when to read them again."""
        renew_at = self._renew_at
        if renew_at is None or (self._expires is None and self._clock() >= renew_at):
            renew_at, self._expires = await self._tls.renewal_time()
            self._renew_at = renew_at
        return self._renew_at

    def lapsed(self, bootstrap_token: str) -> bool:
        """Whether the certificate expired (an uplink down past the third of its life left
        once it was due) and ``bootstrap_token`` is to enrol the agent again: the join port
        issues a new one for a valid bootstrap token, while no handshake succeeds with the
        expired one. Said at the first attempt and again every outage.REMIND_S while it
        lasts; without a token, or once the join port refused this one
        (:meth:`token_refused`), that a person must give it a fresh one, and the saved
        certificate is tried all the same (this machine's clock may be the one wrong)."""
        if self._expires is None or self._expires > self._clock():
            return False
        ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._expires))
        if bootstrap_token and not self._token_refused:
            self._say(logging.WARNING, f"the client certificate expired at {ended}, while the control plane could not be "
                                       "reached to renew it: enrolling again with the bootstrap token")
            return True
        self._say(logging.ERROR, f"the client certificate expired at {ended}: this agent must enrol again (" + (
            "its bootstrap token was refused: restart it with a fresh one (--token, from 'edgeplane token create "
            "--role agent')" if bootstrap_token else "start it with a bootstrap token (--token, from 'edgeplane "
            "token create --role agent')") + ")")
        return False

    def _say(self, level: int, line: str) -> None:
        """``line`` at ``level`` when it is new, or was last said outage.REMIND_S ago; at
        debug level otherwise: the uplink may stay down for days, an attempt every 30 s."""
        log.log(level if self._expiry_said.due(line, self._clock()) else logging.DEBUG, "%s", line)

    def token_refused(self) -> None:
        """The join port refused the bootstrap token an expired certificate's agent enrolled
        with: it is not sent again (each refusal counts against the join failures of this
        agent's address, which other agents behind the same NAT share) until a restart."""
        self._token_refused = True

    async def request(self) -> tuple[bytes, bytes] | None:
        """A key and CSR when the certificate is two thirds through its life (the same pair
        until one is accepted, so reconnect attempts do not each make a key). Best effort:
        a failure here is logged and the join goes on without renewing."""
        try:
            if self._clock() < await self.schedule():
                return None
            return await self.pending()
        except (OSError, errors.AgentError) as exc:
            self.failed(f"cannot prepare the renewal: {exc}")
            return None

    async def pending(self) -> tuple[bytes, bytes]:
        """The key and CSR that the next enrolment or renewal carries: made by the identity
        tool when none is pending, then the same pair until a certificate for it is saved
        (:meth:`renewed`, :meth:`forget`), so that an agent that must enrol while the join
        port cannot be reached (a certificate that expired offline) does not make a key at
        every reconnect, for days. Held in memory only: the saved key and certificate are
        replaced together, as a pair, once one is issued."""
        if self._pending_csr is None:
            self._pending_csr = await self._tls.new_request(self._site)
        return self._pending_csr

    def failed(self, why: str) -> None:
        """Ask again later (:func:`renewal_retry`), saying ``why`` not now."""
        now = self._clock()
        delay = renewal_retry(None if self._expires is None else self._expires - now)
        self._renew_at = now + delay
        log.warning("%s; asking again in %gs", why, delay)

    async def renewed(self, key_pem: bytes, response: pb.JoinResponse) -> None:
        """Keep the certificate a join that carried the CSR of ``key_pem`` brought back,
        saved in a worker thread: its fsyncs may take seconds on a slow disk, during which
        the event loop serves inference, health probes and heartbeats."""
        if not response.certificate_pem:
            self.failed("the control plane issued no new client certificate")
            return
        try:
            await asyncio.to_thread(self._tls.save, key_pem, response.certificate_pem.encode(), response.ca_pem.encode(),
                                    received_at=self._clock())
        except OSError as exc:
            self.failed(f"cannot save the renewed certificate: {exc}")
            return
        self._pending_csr = None
        self._renew_at = self._expires = None  # read from the new certificate at the next join
        log.info("client certificate for site %s renewed; the next connection uses it", self._site)

    async def due(self) -> None:
        """Ends the session (raising RenewalDue) when the certificate is due, so that the
        next join renews it; a long-lived session would otherwise outlast it. A renewal due
        again at once (a clock far off) waits a while first (RENEW_MIN_GAP_S, or a quarter of
        what is left of a short-lived certificate). The identity tool failing to read the
        certificate's dates ends nothing: they are read again later, the session goes on."""
        while True:
            try:
                due = await self.schedule()
            except (OSError, errors.AgentError) as exc:
                self.failed(f"cannot read the client certificate's dates: {exc}")
                continue  # schedule now answers the retry time without running the tool
            if self._renewed_at is not None and self._expires is not None:
                due = max(due, self._renewed_at + min(RENEW_MIN_GAP_S, (self._expires - due) / 4))
            while (wait := due - self._clock()) > 0:
                await asyncio.sleep(min(wait, 3600.0))
            if self._expires is not None:
                break  # due: a renewal; else the dates are read again
        self._renewed_at = self._clock()
        raise errors.RenewalDue("client certificate due for renewal")
