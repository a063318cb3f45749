"""The agent's identity for mutual TLS: enrolment material kept in its data dir.

On first start the agent makes a key and a CSR, joins over the control plane's join port
(server-authenticated TLS, bootstrap token) and receives a client certificate naming its
site, signed by the control plane's CA. Key, certificate and CA (0600) then let every
later connection, restarts included, use mutual TLS on the agent port without the token.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import grpc

from edge_agent import state


def join_address(control_plane: str) -> str:
    """The default join listener: the agent port's host, the next port."""
    host, _, port = control_plane.rpartition(":")
    return f"{host}:{int(port) + 1}"


@dataclass(frozen=True)
class AgentTls:
    data_dir: pathlib.Path
    join_target: str
    ca_file: pathlib.Path | None = None  # trust anchor given by the operator

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

    def new_request(self, site: str) -> tuple[bytes, bytes]:
        # Imported here: cryptography (~7 MB) is needed once, to enrol, not by a running agent.
        from edgeplane_proto import identity

        return identity.new_key_and_csr(site)

    def save(self, key_pem: bytes, certificate_pem: bytes, ca_pem: bytes) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if ca_pem and self.ca_file is None:
            state.write_bytes_atomic(self.saved_ca_path, ca_pem, 0o600)
        state.write_bytes_atomic(self.key_path, key_pem, 0o600)
        state.write_bytes_atomic(self.cert_path, certificate_pem, 0o600)
