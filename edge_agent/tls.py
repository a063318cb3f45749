"""The agent's identity for mutual TLS: enrolment material kept in its data dir.

On first start the agent makes a key and a CSR, joins over the control plane's join port
(server-authenticated TLS, bootstrap token) and receives a client certificate naming its
site, signed by the control plane's CA. Key, certificate and CA (0600) then let every
later connection, restarts included, use mutual TLS on the agent port without the token.
Two thirds into the certificate's life the agent sends a new CSR with its next join (over
mutual TLS, with the certificate still valid) and saves what comes back.

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
import sys
from dataclasses import dataclass
from typing import Any

import grpc

from edge_agent import errors, state

TOOL_TIMEOUT_S = 60.0
UNUSABLE = 3  # the identity tool's exit code for a damaged key or certificate (edgeplane_proto.identity.UNUSABLE)
RENEW_AT = 2 / 3  # of the certificate's validity


def join_address(control_plane: str) -> str:
    """The default join listener: the agent port's host, the next port."""
    host, _, port = control_plane.rpartition(":")
    return f"{host}:{int(port) + 1}"


@dataclass(frozen=True)
class AgentTls:
    data_dir: pathlib.Path
    join_target: str | None  # None: the join listener beside whichever control plane is dialled
    ca_file: pathlib.Path | None = None  # trust anchor given by the operator

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
        """(when to renew the saved certificate, when it expires), as Unix times. Read
        from the certificate once (by the identity tool) and kept next to it, keyed by its
        digest, so that a restart costs no child process."""
        cert = self.cert_path.read_bytes()
        digest = hashlib.sha256(cert + self.key_path.read_bytes()).hexdigest()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kept = json.loads(self.schedule_path.read_text())
            if kept["sha256"] == digest:
                return float(kept["renewAt"]), float(kept["expires"])
        # the tool checks that the key is the certificate's too (errors.CertificateUnusable)
        dates = await _identity_tool("validity", str(self.cert_path), str(self.key_path))
        not_before, not_after = float(dates["notBefore"]), float(dates["notAfter"])
        renew_at = not_before + (not_after - not_before) * RENEW_AT
        with contextlib.suppress(OSError):  # only a cache: a read-only disk costs a child process per start
            state.write_atomic(self.schedule_path, {"sha256": digest, "renewAt": renew_at, "expires": not_after}, 0o600)
        return renew_at, not_after

    def save(self, key_pem: bytes, certificate_pem: bytes, ca_pem: bytes) -> None:
        """Replace key and certificate as a pair: both are written beside the old ones
        (``.new``), then renamed key first; :meth:`recover` finishes or drops a pair that a
        crash interrupted, so the two never stay mismatched."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if ca_pem and self.ca_file is None:
            state.write_bytes_atomic(self.saved_ca_path, ca_pem, 0o600)
        key_new, cert_new = _new(self.key_path), _new(self.cert_path)
        state.write_bytes_atomic(key_new, key_pem, 0o600)
        state.write_bytes_atomic(cert_new, certificate_pem, 0o600)
        os.replace(key_new, self.key_path)
        os.replace(cert_new, self.cert_path)

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
        proc.kill()
        await proc.wait()
        raise errors.ControlPlaneError(f"the identity tool ({args[0]}) did not finish in {TOOL_TIMEOUT_S:g}s") from None
    if proc.returncode == UNUSABLE:
        raise errors.CertificateUnusable(err.decode(errors="replace").strip()[-300:])
    if proc.returncode != 0:
        raise errors.ControlPlaneError(f"the identity tool ({args[0]}) failed: {err.decode(errors='replace').strip()[-300:]}")
    try:
        return dict(json.loads(out))
    except ValueError as exc:
        raise errors.ControlPlaneError(f"the identity tool ({args[0]}) printed no JSON: {exc}") from exc


def _new(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".new")
