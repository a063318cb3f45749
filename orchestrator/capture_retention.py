"""Retention of captured records: each is deleted once past its deployment's current
``retentionDays``, or when its deployment no longer captures.

Why a loop of its own, apart from the leader's passes: captured records are personal data
kept on the data dir of the replica that captured them (one SQLite file per residency
zone), so every replica purges its own, whether or not it leads. The deployments'
policies are read from the store on its threads; the deletes, which touch only the
replica's zone files, run on an ordinary worker thread, so a stalled database delays the
policies, never the zone files' own expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time

from orchestrator import catalog
from orchestrator.distill import store as capture_store
from orchestrator.store import StateStore, StoreError

log = logging.getLogger(__name__)

EVERY_S = 600.0  # ten minutes: retention is counted in days


async def purge_once(store: StateStore, captures: capture_store.ZoneStores) -> None:
    try:
        retention = await store.run(catalog.capture_retention, store)
    except StoreError as exc:  # the records' own expiry still runs out
        log.warning("capture retention: the deployments' policies cannot be read (%s); purging by stored expiry", exc)
        retention = None
    await asyncio.to_thread(captures.purge, time.time(), retention)


async def run(store: StateStore, captures: capture_store.ZoneStores, every_s: float = EVERY_S) -> None:
    """Purge now, then every ``every_s``, until cancelled."""
    while True:
        try:
            await purge_once(store, captures)
        except Exception:  # personal data past its retention: this task must outlive any one failed pass
            log.exception("capture retention pass failed; retrying in %.0f s", every_s)
        await asyncio.sleep(every_s)
