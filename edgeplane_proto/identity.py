"""Agent identity on the wire: the SAN URI that names a site, and the agent's key + CSR.

Both sides must agree on these exactly (the control plane's CA writes the URI, its
servicer reads it back from the peer certificate, the agent makes the CSR), so they live
with the other wire contracts.
"""

from __future__ import annotations

import json
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SPIFFE_PREFIX = "spiffe://edgeplane/site/"


def site_uri(site: str) -> str:
    return SPIFFE_PREFIX + site


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def new_key_and_csr(site: str) -> tuple[bytes, bytes]:
    """What an agent makes: a P-256 key (PEM) and a CSR for ``site/<name>`` (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"site/{site}")]))
           .sign(key, hashes.SHA256()))
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def site_of(certificate_pem: bytes) -> str | None:
    """The site a certificate names in its SAN URI, or None."""
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SPIFFE_PREFIX):
            return uri[len(SPIFFE_PREFIX):]
    return None


def validity(certificate_pem: bytes) -> tuple[float, float]:
    """(not before, not after) of a certificate, as Unix times."""
    cert = x509.load_pem_x509_certificate(certificate_pem)
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeplane_proto.identity csr SITE | validity CERT_FILE``, one JSON object
    on stdout. The agent runs these in a child process: cryptography costs a running agent
    about 7 MB that it would keep for a job it does once a few weeks."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "csr":
        key, csr = new_key_and_csr(args[1])
        print(json.dumps({"key": key.decode(), "csr": csr.decode()}))
        return 0
    if len(args) == 2 and args[0] == "validity":
        try:
            not_before, not_after = validity(pathlib.Path(args[1]).read_bytes())
        except (OSError, ValueError) as exc:
            print(f"cannot read the certificate {args[1]}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"notBefore": not_before, "notAfter": not_after}))
        return 0
    print("usage: python -m edgeplane_proto.identity csr SITE | validity CERT_FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
