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


#: The identity tool's exit code for a key or certificate that cannot be used (damaged, or
#: not a pair), as opposed to one it could not read (1) or a usage error (2).
UNUSABLE = 3


def _check_pair(certificate_pem: bytes, key_pem: bytes, key_path: str) -> str | None:
    """Why the private key (read from ``key_path``) cannot be used with the certificate, or None."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        return f"the private key {key_path} is damaged: {exc}"
    if key.public_key() != x509.load_pem_x509_certificate(certificate_pem).public_key():
        return f"the private key {key_path} is not the certificate's"
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeplane_proto.identity csr SITE | validity CERT_FILE [KEY_FILE]``, one
    JSON object on stdout (``validity`` with a key file also checks that the key is the
    certificate's; exit code :data:`UNUSABLE` when they cannot be used). The agent runs these
    in a child process: cryptography costs a running agent about 7 MB that it would keep for
    a job it does once a few weeks."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "csr":
        key, csr = new_key_and_csr(args[1])
        print(json.dumps({"key": key.decode(), "csr": csr.decode()}))
        return 0
    if len(args) in (2, 3) and args[0] == "validity":
        try:
            pem = pathlib.Path(args[1]).read_bytes()
            key_pem = pathlib.Path(args[2]).read_bytes() if len(args) == 3 else None
        except OSError as exc:
            print(f"cannot read {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        try:
            not_before, not_after = validity(pem)
        except ValueError as exc:
            print(f"the certificate {args[1]} is damaged: {exc}", file=sys.stderr)
            return UNUSABLE
        why = _check_pair(pem, key_pem, args[2]) if key_pem is not None else None
        if why is not None:
            print(why, file=sys.stderr)
            return UNUSABLE
        print(json.dumps({"notBefore": not_before, "notAfter": not_after}))
        return 0
    print("usage: python -m edgeplane_proto.identity csr SITE | validity CERT_FILE [KEY_FILE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
