"""Who may join, and the per-agent credential it gets.

The hub only sees the :class:`JoinAuthenticator` protocol, so the control plane can back it
with its store (hashed bootstrap tokens, revocable credentials) and a later pass can swap
the opaque credential for an mTLS client certificate without touching the hub.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Protocol


class JoinAuthenticator(Protocol):
    def verify_bootstrap(self, token: str) -> bool: ...

    def issue_credential(self, site: str, agent_id: str) -> str: ...

    def verify_credential(self, site: str, credential: str) -> bool: ...


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class InMemoryJoinAuthenticator:
    """Bootstrap tokens and credentials held in memory (hashed); for tests and the demo."""

    def __init__(self, bootstrap_tokens: Iterable[str]) -> None:
        self._tokens = [_digest(t) for t in bootstrap_tokens if t]
        self._credentials: dict[str, bytes] = {}

    def verify_bootstrap(self, token: str) -> bool:
        if not token:
            return False
        probe = _digest(token)
        # No early exit: every comparison runs, each in constant time.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(probe, known)
        return matched

    def issue_credential(self, site: str, agent_id: str) -> str:
        credential = secrets.token_urlsafe(32)
        self._credentials[site] = _digest(credential)
        return credential

    def verify_credential(self, site: str, credential: str) -> bool:
        known = self._credentials.get(site)
        return bool(credential) and known is not None and hmac.compare_digest(
            _digest(credential), known
        )
