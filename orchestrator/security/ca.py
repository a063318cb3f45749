"""The control plane's certificate authority for agent identities (mTLS).

Why a CA of our own: an edge agent must prove *which site* it is on every connection, and
a revocable, per-agent X.509 certificate checked in the TLS handshake does that without
a secret in each request. The CA lives in ``<data-dir>/ca`` (key 0600), created on first
start; it signs the agent gRPC listener's server certificate (SANs for its host,
127.0.0.1 and localhost) and one client certificate per site, whose identity is the SAN
URI ``spiffe://edgeplane/site/<name>`` (the CN says ``site/<name>`` for humans). The
identity comes from the CA, never from the CSR: whatever subject an agent asks for, the
certificate names the site it joined as.

No certificate it signs outlives the CA (a chain fails at the CA's expiry whatever the leaf
says), and the listener's own certificate is issued again two thirds into its life
(:class:`ServerCertificate`), so a control plane that runs for longer than one still
completes every agent's handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import pathlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeplane_proto import identity
from orchestrator import durable

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 365
AGENT_DAYS = 30


class CertificateError(ValueError):
    """A CSR or certificate that cannot be accepted."""


def check_agent_csr(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The key of a well-formed agent CSR; raise :class:`CertificateError` otherwise."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not match its key")
    public_key = csr.public_key()
    # Only P-256: it is the curve the agents generate, and the one gRPC's TLS negotiates; a
    # certificate on another curve (weak P-192, secp256k1, Brainpool) would fail every handshake.
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        got = public_key.curve.name if isinstance(public_key, ec.EllipticCurvePublicKey) else "a non-EC key"
        raise CertificateError(f"agent keys must be EC (P-256), not {got}")
    return public_key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_synced(path: pathlib.Path, data: bytes, mode: int) -> None:
    """A new file at ``path`` (any old one removed: its mode would stay), on disk when this returns."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# The identity format is a wire contract shared with the agent.
site_uri = identity.site_uri
new_key_and_csr = identity.new_key_and_csr
site_of = identity.site_of
_key_pem = identity.key_pem


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    agent_ttl: datetime.timedelta = datetime.timedelta(days=AGENT_DAYS)  # agents renew at two thirds

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (DER), hex: replicas compare theirs with the leader's."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    @classmethod
    def load_or_create(cls, folder: pathlib.Path, name: str = "edgeplane agent CA", trusted: str | None = None,
                       replace: bool = False) -> CertificateAuthority:
        """The CA in ``folder``, made there when it holds none. A new CA's two files are
        written aside (``.ca.key.new``, ``.ca.crt.new``), then put in place, the key first:
        ``ca.crt`` is what agents are given (its path, its fingerprint), so a CA can be
        trusted only once it is whole. A creation cut short (a kill) before the key is in
        place is made again; between the two, its certificate aside completes it.

        ``trusted``: the fingerprint of the CA the enrolled agents trust (the store keeps it).
        A folder that lost it is refused, not given a new CA, unless ``replace`` says the
        operator wants one, knowing that every agent must then enrol again."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = folder / "ca.key", folder / "ca.crt"
        new_key, new_cert = folder / ".ca.key.new", folder / ".ca.crt.new"
        if key_path.exists() and not cert_path.exists() and new_cert.exists():
            authority = cls._load(key_path, new_cert)  # refused unless they belong together
            os.replace(new_cert, cert_path)
            durable.sync_folder(folder)
            log.info("completed the agent CA in %s, whose creation was cut short", folder)
            return authority
        if key_path.exists() and cert_path.exists():
            return cls._load(key_path, cert_path)
        if key_path.exists() or cert_path.exists():  # a new CA would orphan every agent that trusts the old one
            there, missing = (key_path, cert_path) if key_path.exists() else (cert_path, key_path)
            raise CertificateError(f"{folder} holds {there.name} but not {missing.name}: restore it (a new CA would not be "
                                   "trusted by the agents that joined); only a folder with neither gets a new CA")
        if trusted is not None and not replace:
            raise CertificateError(f"{folder} holds no CA, and the store's agents trust the CA with SHA-256 {trusted}: restore "
                                   f"{folder} from a backup, or copy it from another replica (a new CA would not be trusted by "
                                   "the agents that joined), or start with --new-agent-ca to make a new one, after which every "
                                   "agent must enrol again")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _write_synced(new_key, _key_pem(key), 0o600)
        _write_synced(new_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        os.replace(new_key, key_path)
        os.replace(new_cert, cert_path)
        durable.sync_folder(folder)
        return cls(key, cert)

    @classmethod
    def _load(cls, key_path: pathlib.Path, cert_path: pathlib.Path) -> CertificateAuthority:
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CertificateError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{key_path} is not an EC private key")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise CertificateError(f"{cert_path} is not a PEM certificate: {exc}") from None
        if cert.public_key() != key.public_key():
            raise CertificateError(f"{cert_path} and {key_path} do not belong together: the certificate is of another key")
        return cls(key, cert)

    def _issue(self, subject: str, public_key: ec.EllipticCurvePublicKey, sans: list[x509.GeneralName],
               usage: x509.ObjectIdentifier, ttl: datetime.timedelta, now: datetime.datetime | None = None) -> x509.Certificate:
        now = now or _now()
        refusal = self.signing_refusal(now)
        if refusal is not None:
            raise CertificateError(refusal)
        ca_ends = self.certificate.not_valid_after_utc
        ttl = min(ttl, ca_ends - now)  # a certificate past its CA's expiry fails its chain from then on anyway
        backdate = min(datetime.timedelta(minutes=5), ttl / 10)  # for clocks a little behind ours
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(self.certificate.subject).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - backdate)
                .not_valid_after(now + ttl)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert

    def issue_server(self, hosts: list[str], now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for the agent listener, valid for ``hosts`` + loopback,
        ``SERVER_DAYS`` or until the CA expires."""
        cert, key = self._server_certificate(hosts, now)
        return cert.public_bytes(serialization.Encoding.PEM), key

    def _server_certificate(self, hosts: list[str], now: datetime.datetime | None) -> tuple[x509.Certificate, bytes]:
        """:meth:`issue_server`'s certificate as made (its dates to hand) and its key PEM."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue("edgeplane control plane", key.public_key(), sans, ExtendedKeyUsageOID.SERVER_AUTH,
                           datetime.timedelta(days=SERVER_DAYS), now), _key_pem(key)

    def signing_refusal(self, now: datetime.datetime | None = None) -> str | None:
        """Why this CA signs nothing at ``now`` (it expired), None while it signs."""
        ends = self.certificate.not_valid_after_utc
        if (now or _now()) < ends:
            return None
        return (f"the agents' CA expired at {ends:%Y-%m-%d %H:%M:%S} UTC (its notAfter): no certificate it signs is trusted; "
                "agents must join a new CA")

    def view(self, now: datetime.datetime | None = None) -> dict[str, str | int]:
        """What ``edgeplane status`` shows of this CA (``agentCa`` in ``GET /v1/controlplane``):
        its SHA-256, its notAfter, and the seconds left until then (below 0: past it)."""
        ends = self.certificate.not_valid_after_utc
        return {"sha256": self.fingerprint, "notAfter": f"{ends:%Y-%m-%dT%H:%M:%SZ}",
                "expiresInSeconds": int((ends - (now or _now())).total_seconds())}

    def check_agent_csr(self, csr_pem: bytes) -> None:
        """Raise :class:`CertificateError` unless :meth:`issue_agent` would sign ``csr_pem``."""
        check_agent_csr(csr_pem)

    def issue_agent(self, site: str, csr_pem: bytes) -> bytes:
        """Sign an agent's CSR as ``site``: the identity is ours to set, not the CSR's."""
        public_key = check_agent_csr(csr_pem)
        return self._issue(f"site/{site}", public_key, [x509.UniformResourceIdentifier(site_uri(site))],
                           ExtendedKeyUsageOID.CLIENT_AUTH, self.agent_ttl).public_bytes(serialization.Encoding.PEM)


class ServerCertificate:
    """The agent listener's certificate chain (its certificate, then the CA's) and key, issued
    again once two thirds of its life has passed: the listener asks on every handshake, from
    gRPC's threads. One that ends with the CA is kept to its end (any other would end then
    too), and past the CA's end the last one is served: nothing the CA signs is trusted any
    more, which is said once, not on every handshake."""

    def __init__(self, ca: CertificateAuthority, hosts: list[str],
                 clock: Callable[[], datetime.datetime] = _now) -> None:
        self._ca, self._hosts, self._clock = ca, hosts, clock
        self._lock = threading.Lock()
        self._current = self._issue()
        self._said_expired = False

    def _issue(self) -> tuple[bytes, bytes, datetime.datetime]:
        now = self._clock()
        cert, key = self._ca._server_certificate(self._hosts, now)
        ends = cert.not_valid_after_utc
        renew = ends if ends >= self._ca.certificate.not_valid_after_utc else now + (ends - now) * 2 / 3
        # the CA rides in the chain: an agent given only its SHA-256 (--ca-sha256) takes it from there
        return cert.public_bytes(serialization.Encoding.PEM) + self._ca.certificate_pem, key, renew

    def current(self) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM), a new pair once the one before is due for renewal."""
        with self._lock:
            now = self._clock()
            if now >= self._current[2]:
                refusal = self._ca.signing_refusal(now)
                if refusal is None:
                    self._current = self._issue()
                elif not self._said_expired:
                    self._said_expired = True
                    log.error("%s; the agent listener keeps serving its last certificate, which agents no longer accept", refusal)
            return self._current[0], self._current[1]
