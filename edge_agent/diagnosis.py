"""Why the agent cannot reach its control plane, said as the flag that fixes it.

gRPC reports a failed connection as its transport saw it ("Socket closed", "Connection
refused", an OpenSSL reason code): true, but it names no flag, and from the agent's side a
wrong TLS setting looks much like a control plane that is down. :func:`symptom` reads what
gRPC said; where that alone cannot tell the causes apart, :func:`probe` asks an address what
it speaks (a TLS handshake, then an HTTP/2 preface); :func:`hint` names the likely cause and
the flag, and says nothing where the evidence does not fit. Only :func:`probe` does I/O.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from dataclasses import dataclass

from edge_agent import tls

PROBE_TIMEOUT_S = 3.0
# An HTTP/2 client preface and an empty SETTINGS frame: a plaintext gRPC server answers
# with its own SETTINGS frame (type 4, the fourth byte of the frame header).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x04


class Symptom(enum.Enum):
    """What the failed connection met, as gRPC (or the socket) reported it."""

    REFUSED = "refused"  # nothing listens at that address
    CLOSED = "closed"  # hung up before HTTP/2 began: e.g. a TLS port dialled in plaintext
    NOT_TLS = "not TLS"  # a TLS handshake met something that does not speak TLS
    HTTP1 = "HTTP/1"  # an HTTP/1 server: the control plane's API port?
    UNTRUSTED = "untrusted"  # the peer's certificate does not chain to what the agent trusts
    NAME = "name"  # the certificate does not name the host dialled
    CLOCK = "clock"  # a certificate outside its validity period
    HANDSHAKE = "handshake"  # another TLS failure
    OTHER = "other"


# Lowercase signs in gRPC's details (or an OSError's text), the most specific first.
_SIGNS = (
    ("connection refused", Symptom.REFUSED),
    ("wrong_version_number", Symptom.NOT_TLS),
    ("wrong version number", Symptom.NOT_TLS),
    ("http1.x server", Symptom.HTTP1),
    ("hostname verification", Symptom.NAME),
    ("not in peer certificate", Symptom.NAME),
    ("certificate has expired", Symptom.CLOCK),
    ("certificate is not yet valid", Symptom.CLOCK),
    ("certificate_verify_failed", Symptom.UNTRUSTED),
    ("bad_signature", Symptom.UNTRUSTED),
    ("handshake failed", Symptom.HANDSHAKE),
    ("socket closed", Symptom.CLOSED),
    ("connection reset", Symptom.CLOSED),
)


def symptom(detail: str) -> Symptom:
    lowered = detail.lower()
    return next((found for sign, found in _SIGNS if sign in lowered), Symptom.OTHER)


class Listener(enum.Enum):
    """What answers at an address."""

    TLS = "TLS"
    PLAINTEXT = "plaintext gRPC"  # HTTP/2 without TLS: a control plane with --insecure-agents
    OTHER = "other"  # answers, but neither
    NOTHING = "nothing"  # connection refused
    UNKNOWN = "unknown"  # no answer in time, or an error that tells nothing


@dataclass(frozen=True)
class Dial:
    """The connection that failed, as far as a hint may rely on it."""

    target: str  # the address dialled
    control_plane: str  # the --control-plane address in use (the agent port)
    tls: bool  # False: --insecure
    join: bool = False  # the first join, on the join listener
    join_address: bool = False  # that listener was given (--join-address), not --control-plane's port + 1
    ca_file: str = ""  # --ca-file
    saved_ca: str = ""  # without --ca-file: the CA kept from an earlier join (<data dir>/ca.crt), if any
    client_cert: str = ""  # mutual TLS: the client certificate shown (<data dir>/agent.crt)


def to_probe(found: Symptom, dial: Dial) -> str | None:
    """The address whose answer tells the likely causes of ``found`` apart; None: no need."""
    if found is Symptom.CLOSED and (not dial.tls or dial.client_cert):
        return dial.target  # a TLS port, or one refusing this client certificate, or a control plane going down?
    if found is Symptom.NOT_TLS:
        return dial.target  # a control plane with --insecure-agents, or something else?
    if found is Symptom.REFUSED and dial.join:
        return dial.control_plane  # no join port there, or no control plane at all?
    return None


_GIVE_CA = "--ca-file <control-plane data dir>/ca/ca.crt or --ca-sha256 (as 'edgeplane token create' prints it)"
_THIS_CA = "the ca.crt of this control plane (<control-plane data dir>/ca/ca.crt, or the CA given to every replica)"
_ENROL_AGAIN = "from the agent's data dir and start it with a new bootstrap token"
_INSECURE = "a control plane started with --insecure-agents takes agents with --insecure (and no --ca-file or --ca-sha256)"


def hint(found: Symptom, dial: Dial, listener: Listener | None = None) -> str:
    """The likely cause and the flag that fixes it, or "" where the evidence does not fit
    (``listener``: what :func:`probe` found at :func:`to_probe`'s address)."""
    port = "join port ('edgeplane serve --agent-join-port')" if dial.join else "agent port ('edgeplane serve --agent-port')"
    if found is Symptom.CLOSED and listener is Listener.TLS and not dial.tls:
        return f"{dial.target} speaks TLS, so the control plane takes agents over mutual TLS: drop --insecure and give {_GIVE_CA}"
    if found is Symptom.CLOSED and listener is Listener.TLS and dial.client_cert:
        return (f"{dial.target} is up but ended the TLS handshake: it most likely refuses this agent's client certificate "
                f"({dial.client_cert}), e.g. one issued before the control plane's CA was made again; if this repeats (once can "
                f"be a control plane restarting), remove agent.key and agent.crt {_ENROL_AGAIN}")
    if found is Symptom.NOT_TLS and listener is Listener.PLAINTEXT:
        return f"{dial.target} speaks plaintext gRPC: {_INSECURE}"
    if found is Symptom.NOT_TLS and listener is Listener.OTHER:
        return f"{dial.target} does not speak TLS: is it the control plane's {port}?"
    if found is Symptom.HTTP1:
        return f"{dial.target} answers HTTP/1, not gRPC: give the control plane's {port}, not its API port"
    if found is Symptom.REFUSED and dial.join:
        where = f"--join-address {dial.target}" if dial.join_address else f"the join port {dial.target} (--control-plane's port + 1)"
        if listener is Listener.PLAINTEXT:
            return f"nothing answers on {where} and {dial.control_plane} speaks plaintext gRPC: {_INSECURE}"
        if listener is Listener.TLS:
            fix = "check --join-address against" if dial.join_address else "give --join-address HOST:PORT,"
            return (f"nothing answers on {where} but {dial.control_plane} speaks TLS: {fix} the 'first joins on' address "
                    "that 'edgeplane serve' printed (its --agent-join-port)")
        if listener is Listener.NOTHING:
            return f"nothing answers on {dial.control_plane} either: is the control plane running there?"
        return ""
    if found is Symptom.UNTRUSTED:
        if dial.ca_file:
            return f"the control plane's certificate is not signed by --ca-file {dial.ca_file}: give --ca-file {_THIS_CA}"
        if dial.saved_ca:
            return (f"the control plane's certificate is not signed by the CA this agent kept from its first join "
                    f"({dial.saved_ca}): if the control plane's CA was made again, remove ca.crt, agent.key and agent.crt "
                    f"{_ENROL_AGAIN} and {_GIVE_CA}")
        return (f"the control plane's certificate is not signed by a CA this machine trusts, and neither --ca-file nor "
                f"--ca-sha256 was given: give {_GIVE_CA}")
    if found is Symptom.NAME:
        host = dial.target.rpartition(":")[0].strip("[]")
        return (f"the control plane's certificate does not name {host}: dial a name it covers, or start the control plane "
                f"with --agent-tls-name {host}")
    if found is Symptom.CLOCK:
        return "a certificate is outside its validity period: check this machine's clock (and the control plane's)"
    if found is Symptom.HANDSHAKE:
        return (f"the TLS handshake failed: check that --ca-file is {_THIS_CA}, that --control-plane names a host its "
                "certificate covers, and that this machine's clock is right")
    return ""


async def probe(target: str, timeout: float = PROBE_TIMEOUT_S) -> Listener:
    """What answers at ``target`` (``host:port``): a TLS handshake first (unverified: only
    whether it speaks TLS), then an HTTP/2 preface in plaintext."""
    return await asyncio.to_thread(_probe, target, timeout)


def _probe(target: str, timeout: float) -> Listener:
    import ssl  # imported by tls.peer_chain anyway; not before the daemon needs it

    try:
        tls.peer_chain(target, timeout)
        return Listener.TLS
    except ConnectionRefusedError:
        return Listener.NOTHING
    except ssl.SSLError as exc:
        if "ALERT" in (exc.reason or ""):
            return Listener.TLS  # a TLS peer that refused this handshake (no client certificate)
    except (OSError, ValueError):
        return Listener.UNKNOWN
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(_H2_PREFACE)
            header = b""
            while len(header) < 4 and (chunk := sock.recv(9 - len(header))):
                header += chunk
    except OSError:
        return Listener.UNKNOWN
    return Listener.PLAINTEXT if len(header) >= 4 and header[3] == _SETTINGS else Listener.OTHER
