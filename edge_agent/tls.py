"""The agent's identity for mutual TLS: enrolment material kept in its data dir.

On first start the agent makes a key and a CSR, joins over the control plane's join port
(server-authenticated TLS, bootstrap token) and receives a client certificate naming its
site, signed by the control plane's CA. Key, certificate and CA (0600) then let every
later connection, restarts included, use mutual TLS on the agent port without the token.
Two thirds into the certificate's life the agent sends a new CSR with its next join (over
mutual TLS, with the certificate still valid) and saves what comes back.

With ``--ca-sha256`` instead of ``--ca-file`` the agent takes the CA from the join
listener's certificate chain, trusted only because its SHA-256 is the one the operator
gave (``edgeplane token create`` prints it), and keeps it in the data dir.

Keys, CSRs and reading a certificate's dates are done by ``python -m
edgeplane_proto.identity`` in a child process: cryptography would cost the daemon about
7 MB, for the rest of its life, for a job it does once every few weeks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pathlib
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

import grpc

from edge_agent import errors, state

TOOL_TIMEOUT_S = 60.0
UNUSABLE = 3  # the identity tool's exit code for a damaged key or certificate (edgeplane_proto.identity.UNUSABLE)
RENEW_AT = 2 / 3  # of the certificate's validity


PIN_FETCH_TIMEOUT_S = 10.0


def peer_chain(target: str, timeout: float) -> list[bytes]:
    """The certificates (DER) a TLS listener at ``host:port`` presents, unverified."""
    import _ssl  # Python's TLS is imported where it is needed: see edge_agent.main
    import ssl

    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # what a gRPC listener expects
    with socket.create_connection((host, int(port)), timeout=timeout) as raw, context.wrap_socket(raw, server_hostname=host) as sock:
        if hasattr(sock, "get_unverified_chain"):  # Python 3.13: DER bytes
            return list(sock.get_unverified_chain())
        return [cert.public_bytes(_ssl.ENCODING_DER) for cert in sock._sslobj.get_unverified_chain()]  # type: ignore[union-attr]


def join_address(control_plane: str) -> str:
    """The default join listener: the agent port's host, the next port."""
    host, _, port = control_plane.rpartition(":")
    return f"{host}:{int(port) + 1}"


@dataclass(frozen=True)
class AgentTls:
    data_dir: pathlib.Path
    join_target: str | None  # None: the join listener beside whichever control plane is dialled
    ca_file: pathlib.Path | None = None  # trust anchor given by the operator
    ca_sha256: str | None = None  # or its pin: SHA-256 of the CA certificate (DER), lowercase hex

    def needs_pinned_ca(self) -> bool:
        """Whether the CA must be fetched by its pin: none is saved, or the saved one is not the
        pin's (the pin is the operator's word, newer than a file the agent saved itself: an
        agent enrolled again at a control plane with a new CA)."""
        return self.ca_sha256 is not None and self.ca_file is None and self.saved_ca_sha256() != self.ca_sha256

    def saved_ca_sha256(self) -> str | None:
        """The SHA-256 (of the DER) of the CA saved in the data dir; None when none is, or it is unreadable."""
        import ssl

        try:
            return hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.saved_ca_path.read_text())).hexdigest()
        except (OSError, ValueError):
            return None

    async def fetch_pinned_ca(self, target: str) -> None:
        """Take the CA whose SHA-256 is the pin from the certificate chain ``target`` presents
        (the handshake is not verified: the pin is the trust) and keep it as the saved CA."""
        import ssl

        try:
            chain = await asyncio.to_thread(peer_chain, target, PIN_FETCH_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            raise errors.AgentUnavailable(f"cannot read the certificate chain of {target} to find the pinned CA: {exc}") from exc
        for der in chain:
            if hashlib.sha256(der).hexdigest() == self.ca_sha256:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(state.write_bytes_atomic, self.saved_ca_path, ssl.DER_cert_to_PEM_cert(der).encode(), 0o600)
                return
        raise errors.JoinRefused(f"{target} presented no certificate with SHA-256 {self.ca_sha256} ({len(chain)} in its chain): "
                                 "check --ca-sha256 against 'edgeplane token create' or <control-plane data dir>/ca/ca.crt")

    def join_target_for(self, control_plane: str) -> str:
        """Where to enrol while ``control_plane`` is the address in use: with several
        replicas, only the leader's join listener accepts, so the first join moves with
        the agent from one address to the next unless ``--join-address`` fixes it."""
        return self.join_target or join_address(control_plane)

    @property
    def key_path(self) -> pathlib.Path:
        return self.data_dir / "agent.key"

    @property
    def cert_path(self) -> pathlib.Path:
        return self.data_dir / "agent.crt"

    @property
    def saved_ca_path(self) -> pathlib.Path:
        return self.data_dir / "ca.crt"

    def enrolled(self) -> bool:
        self.recover()
        return self.key_path.exists() and self.cert_path.exists()

    def _roots(self) -> bytes | None:
        if self.ca_file is not None:
            return self.ca_file.read_bytes()
        if self.saved_ca_path.exists():
            return self.saved_ca_path.read_bytes()
        return None  # the system's roots: a control plane with a publicly trusted certificate

    def join_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._roots())

    def mutual_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._roots(), private_key=self.key_path.read_bytes(), certificate_chain=self.cert_path.read_bytes()
        )

    async def new_request(self, site: str) -> tuple[bytes, bytes]:
        """A fresh private key and a CSR for ``site`` (PEM each)."""
        made = await _identity_tool("csr", site)
        return made["key"].encode(), made["csr"].encode()

    @property
    def schedule_path(self) -> pathlib.Path:
        return self.data_dir / "agent.crt.renewal.json"

    async def renewal_time(self) -> tuple[float, float]:
        """(when to renew the saved certificate, when it expires), as Unix times by this
        machine's clock. Read from the certificate once (by the identity tool) and kept next
        to it, keyed by its digest, so that a restart costs no child process.

        A certificate received (:meth:`save`'s ``received_at``) before it begins by this
        machine's clock was made by a control plane whose clock is ahead of this one by as
        much at least (it backdates by a few minutes only): both times are moved earlier by
        that much, or the renewal, two thirds into the certificate's life by this clock,
        could come after its end by the control plane's, which then refuses it."""
        cert = self.cert_path.read_bytes()
        digest = hashlib.sha256(cert + self.key_path.read_bytes()).hexdigest()
        kept: Any = None
        with contextlib.suppress(OSError, ValueError):
            kept = json.loads(self.schedule_path.read_text())
        kept = kept if isinstance(kept, dict) and kept.get("sha256") == digest else {}
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return float(kept["renewAt"]), float(kept["expires"])
        received_at = kept.get("receivedAt")  # saved with the certificate, its dates not read yet
        if not isinstance(received_at, (int, float)) or isinstance(received_at, bool):
            received_at = None
        # the tool checks that the key is the certificate's too (errors.CertificateUnusable)
        dates = await _identity_tool("validity", str(self.cert_path), str(self.key_path))
        not_before, not_after = float(dates["notBefore"]), float(dates["notAfter"])
        behind = max(0.0, not_before - received_at) if received_at is not None else 0.0
        renew_at = not_before + (not_after - not_before) * RENEW_AT - behind
        schedule: dict[str, Any] = {"sha256": digest, "renewAt": renew_at, "expires": not_after - behind}
        if received_at is not None:
            schedule["receivedAt"] = received_at
        with contextlib.suppress(OSError):  # only a cache: a read-only disk costs a child process per start
            await asyncio.to_thread(state.write_atomic, self.schedule_path, schedule, 0o600)
        return renew_at, not_after - behind

    def save(self, key_pem: bytes, certificate_pem: bytes, ca_pem: bytes, received_at: float | None = None) -> None:
        """Replace key and certificate as a pair: both are written beside the old ones
        (``.new``), then renamed key first; :meth:`recover` finishes or drops a pair that a
        crash interrupted, so the two never stay mismatched. ``received_at``: when the
        control plane's answer came, by this machine's clock (:meth:`renewal_time` compares
        it with the certificate's start); kept beside the certificate, best effort. Each
        file is synced, which may take seconds on a slow disk: the agent calls this in a
        worker thread, never on its event loop."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if ca_pem and self.ca_file is None:
            state.write_bytes_atomic(self.saved_ca_path, ca_pem, 0o600)
        key_new, cert_new = _new(self.key_path), _new(self.cert_path)
        state.write_bytes_atomic(key_new, key_pem, 0o600)
        state.write_bytes_atomic(cert_new, certificate_pem, 0o600)
        os.replace(key_new, self.key_path)
        os.replace(cert_new, self.cert_path)
        if received_at is not None:
            digest = hashlib.sha256(certificate_pem + key_pem).hexdigest()
            with contextlib.suppress(OSError):  # without it the certificate's dates alone set the renewal
                state.write_atomic(self.schedule_path, {"sha256": digest, "receivedAt": received_at}, 0o600)

    def set_aside(self) -> list[pathlib.Path]:
        """Rename an unusable key and certificate to ``<name>.unreadable``, so that the
        agent enrols again (the files are kept for inspection)."""
        kept = []
        for path in (self.key_path, self.cert_path):
            if path.exists():
                os.replace(path, path.with_name(path.name + ".unreadable"))
                kept.append(path.with_name(path.name + ".unreadable"))
        self.schedule_path.unlink(missing_ok=True)
        return kept

    def recover(self) -> None:
        """After a crash in :meth:`save`: both ``.new`` files written -> finish; only the
        certificate's left (the key was renamed) -> finish; only the key's -> drop it."""
        key_new, cert_new = _new(self.key_path), _new(self.cert_path)
        if cert_new.exists():
            if key_new.exists():
                os.replace(key_new, self.key_path)
            os.replace(cert_new, self.cert_path)
        else:
            key_new.unlink(missing_ok=True)


async def _identity_tool(*args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeplane_proto.identity", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TOOL_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        raise errors.ControlPlaneError(f"the identity tool ({args[0]}) did not finish in {TOOL_TIMEOUT_S:g}s") from None
    finally:  # timed out, or the agent stops: the key it was making is not wanted
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode == UNUSABLE:
        raise errors.CertificateUnusable(err.decode(errors="replace").strip()[-300:])
    if proc.returncode < 0:
        raise errors.ControlPlaneError(f"the identity tool ({args[0]}) was stopped by signal {-proc.returncode} "
                                       f"({signal.strsignal(-proc.returncode)})")
    if proc.returncode != 0:
        raise errors.ControlPlaneError(f"the identity tool ({args[0]}) failed: {err.decode(errors='replace').strip()[-300:]}")
    try:
        return dict(json.loads(out))
    except ValueError as exc:
        raise errors.ControlPlaneError(f"the identity tool ({args[0]}) printed no JSON: {exc}") from exc


def _new(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".new")
