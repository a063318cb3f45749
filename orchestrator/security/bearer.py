"""The token of an ``Authorization`` header (shared by the control API and the gateways)."""

from __future__ import annotations


def bearer_secret(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None for anything else."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None
