"""Agents' CAs at a chosen point of their life, for tests of what happens as one ends.

A CA's notAfter is ten years out when it is made (``CA_DAYS``): a test of its end, or of
the weeks before it, needs one made as if years earlier, kept in the folder a control
plane loads it from (``<data-dir>/ca``).
"""

from __future__ import annotations

import datetime
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from orchestrator.security import ca


def ca_ending(folder: pathlib.Path, ends: datetime.datetime) -> ca.CertificateAuthority:
    """The agents' CA in ``folder`` (made there if it has none), its certificate signed again
    to end at ``ends`` and written back, so that a control plane started on it has that one."""
    made = ca.CertificateAuthority.load_or_create(folder)
    subject = made.certificate.subject
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(made.key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(ends - datetime.timedelta(days=ca.CA_DAYS)).not_valid_after(ends)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(made.key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return ca.CertificateAuthority(made.key, certificate)
