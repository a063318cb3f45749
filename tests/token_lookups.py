"""Which secrets a control plane's store was asked to look up, for the gateway and security tests.

Why: a made-up token must be limited before it costs a lookup, on the control plane's own
gateway and on a standalone one alike; both tests count the lookups the same way, through
the store's one token check (``verify_token``).
"""

from __future__ import annotations

import pytest

from orchestrator.store import sqlite as store_mod


def counted(monkeypatch: pytest.MonkeyPatch, store: store_mod.Store) -> list[str]:
    """The secrets ``store`` is asked to verify from now on, in order; each still verified as before."""
    looked_up: list[str] = []
    verify = store.verify_token

    def counting(secret: str, purpose: str) -> store_mod.TokenInfo | None:
        looked_up.append(secret)
        return verify(secret, purpose)

    monkeypatch.setattr(store, "verify_token", counting)
    return looked_up
