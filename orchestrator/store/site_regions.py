"""Sites' regions in the form this release stores them: composed (NFC).

Why on start: a region typed decomposed (NFD, as macOS often holds text) and the same one
typed composed are one region, and since regions are compared composed every write stores
them so (a manifest's apply, an agent's registration). A Site an earlier release stored
keeps the form it was given, which the API, the CLI and the console show as it is: a second
region that prints like the first. So opening the store rewrites those rows once, inside
the schema transaction, under the write lock every writer takes. Only the text's form
changes, not what it means, so the row keeps its generation and resourceVersion (a watcher
has nothing new to act on); a later start finds nothing to rewrite.

Each function runs inside the caller's transaction (``db``), through the hooks of ``store``,
the backend (its placeholder).
"""

from __future__ import annotations

import json
import unicodedata
from typing import TYPE_CHECKING, Any

from orchestrator.store.values import canonical

if TYPE_CHECKING:
    from orchestrator.store.sql import SqlStore


def compose(store: SqlStore, db: Any) -> int:
    """Rewrite every stored Site whose ``spec.location.region`` is not composed; how many were."""
    rows = db.execute(store._q("SELECT name, spec FROM objects WHERE kind = ?"), ("Site",)).fetchall()
    rewritten = 0
    for row in rows:
        spec = _composed(json.loads(row["spec"]))
        if spec is not None:
            db.execute(store._q("UPDATE objects SET spec = ? WHERE kind = ? AND name = ?"), (canonical(spec), "Site", row["name"]))
            rewritten += 1
    return rewritten


def _composed(spec: Any) -> dict[str, Any] | None:
    """``spec`` with its region composed, or None when it has none to compose (or is not a
    Site's shape at all: the manifests' checks say so where it is read)."""
    location = spec.get("location") if isinstance(spec, dict) else None
    region = location.get("region") if isinstance(location, dict) else None
    if not isinstance(region, str) or unicodedata.is_normalized("NFC", region):
        return None
    return {**spec, "location": {**location, "region": unicodedata.normalize("NFC", region)}}  # type: ignore[dict-item]
