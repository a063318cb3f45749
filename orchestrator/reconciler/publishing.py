"""What the leader tells the other replicas through the store.

Three documents, each under its ``published`` key: the endpoint table (which the other
replicas' gateways route from, and which a control plane that restarts routes from until
its agents have rejoined), what its passes observed (the other replicas' previews and
views, :mod:`orchestrator.reconciler.observed`) and why the fleet is on hold. Apart from
:mod:`orchestrator.reconciler.loop`, which decides what to say: this writes it, only what
changed, beside the pass (a write that waits on the database holds up no pass), one write
of each document at a time and the latest at each turn, each fenced by the lease held when
it runs. A new term says everything again (:meth:`Publisher.forget`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import wire
from orchestrator.reconciler import hold
from orchestrator.reconciler import observed as observed_mod
from orchestrator.store import sqlite as store_mod

log = logging.getLogger(__name__)


@dataclass
class Publisher:
    """The leader's writes of ``table``, of its observed fleet and of the hold's reason.

    ``clock`` and ``lease`` are read at each call: the reconciler's, which change (a test's
    stopped clock, a new lease when the replica leads again). ``load_publish_s``: a change
    of agents' load alone (in the table) or of download progress alone (in the observed
    fleet) is written at most this often."""

    store: store_mod.Store
    table: endpoints_mod.EndpointTable
    clock: Callable[[], float]
    lease: Callable[[], store_mod.Lease | None]
    load_publish_s: float = 15.0
    _writes: set[asyncio.Task[None]] = field(default_factory=set)  # under way, beside the pass
    _publishing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _published: wire.TableContents | None = None  # the table the last publish wrote
    _published_at: float = 0.0  # when (the clock's)
    _observing: asyncio.Lock = field(default_factory=asyncio.Lock)
    _observed_next: observed_mod.Observed | None = None  # the latest pass's, not written yet
    _observed_published: tuple[str, str] | None = None  # the observed fleet last written, and its decisive part
    _observed_at: float = 0.0  # when (the clock's)
    _hold_published: str | None = None  # the hold's reason ("" none) last written; None: not yet

    def forget(self) -> None:
        """What was written: another leader may have written since this replica last did."""
        self._published = None
        self._observed_published = None
        self._hold_published = None

    async def done(self, timeout: float = 10.0) -> None:
        """Until the writes begun so far have ended, at most ``timeout`` seconds."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)

    def mark_down(self, url: str) -> None:
        """Route to ``url`` no more, at once (its agent is lost): in this replica's table, kept
        down by the tables of passes that read the store before now, and in the one published
        for the other replicas' gateways."""
        if self.table.mark_down(url):
            self.table_changed()

    def table_changed(self) -> None:
        """The table goes to the store, the same document the watch sends to standalone
        gateways: several replicas' gateways route from the leader's, and a control plane
        that restarts routes from the one it left until its agents have rejoined (see
        ``Reconciler.resume``). Beside the pass, which goes on meanwhile."""
        self._beside(self._table_latest(), "publish-table")

    def observed(self, o: observed_mod.Observed) -> None:
        """What a pass observed goes to the store for the other replicas' previews and views,
        beside the pass as the table does."""
        self._observed_next = o
        self._beside(self._observed_latest(), "publish-observed")

    async def hold(self, why: str) -> None:
        """The hold's reason ("" none) for every replica's view, when it changed. In the pass:
        one that fails to write it is retried as a whole."""
        if why != self._hold_published:
            await self.store.run(self.store.publish, hold.PUBLISHED_KEY, why, lease=self.lease())
            self._hold_published = why

    def _beside(self, write: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(write, name=name)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _table_latest(self) -> None:
        """Only a table that changed, encoded in a worker thread (at 10,000 endpoints, about
        25 ms that the gateway on this loop must not wait behind, nor the store's callers
        behind it on the store's few threads) and written on the store's, one at a time and
        the latest at each turn, so that an older table never lands after a newer one. A
        failed write is tried again at the next change or pass.

        A table whose only change is agents' in-flight counts is written at most every
        ``load_publish_s``: some agent's count moves between nearly any two passes of a busy
        fleet, and each write is the whole document (2.8 MB at 10,000 endpoints), which
        every follower then reads whole. Any other change is written at once, with the
        load as it is then. This replica's gateway routes with the load of each pass, and
        the watch sends standalone gateways each change as a delta; followers' gateways
        route with load up to that old, beside their own in-flight counts."""
        async with self._publishing:
            contents = wire.contents_of(self.table)
            if contents == self._published:
                return
            if (self._published is not None and self.clock() - self._published_at < self.load_publish_s
                    and wire.only_load_changed(self._published, contents)):
                return  # a later pass writes it (one runs at least every resync_s)
            text = await asyncio.to_thread(wire.contents_to_text, contents)
            if await self._write(wire.PUBLISHED_KEY, text, "endpoint table"):
                self._published, self._published_at = contents, self.clock()

    async def _observed_latest(self) -> None:
        """The latest pass's observed fleet, when it changed, encoded in a worker thread (a
        large fleet's takes milliseconds the gateway must not wait) and written one at a time,
        so an older one never lands after a newer one. A change of download progress alone
        (the messages of models loading, which move at nearly every pass of a download, as
        :func:`orchestrator.agents.hub._decisive` judges) is written at most every
        ``load_publish_s``, as the table's load is: each write is the whole document, which
        every follower reads whole. A failed write is tried again at the next pass."""
        async with self._observing:
            o, self._observed_next = self._observed_next, None
            if o is None:  # a later turn's: written by the turn that took it
                return
            texts = await asyncio.to_thread(observed_mod.to_texts, o)
            last = self._observed_published
            if last is not None and (texts[0] == last[0] or (
                    texts[1] == last[1] and self.clock() - self._observed_at < self.load_publish_s)):
                return  # unchanged, or only progress: a later pass writes it
            # stamped with the time it is written, which the comparisons leave out: what changed is told without it
            text = await asyncio.to_thread(observed_mod.to_text, dataclasses.replace(o, at=self.store.now()))
            if await self._write(observed_mod.PUBLISHED_KEY, text, "observed fleet"):
                self._observed_published, self._observed_at = texts, self.clock()

    async def _write(self, key: str, text: str, what: str) -> bool:
        """Publish ``text`` under ``key`` with the lease held when the write runs; False when
        it was not written (no longer leading: the new leader publishes; or the store failed:
        a later pass writes it again)."""
        lease = self.lease
        try:
            await self.store.run(lambda: self.store.publish(key, text, lease=lease()))
        except store_mod.Fenced as exc:
            log.info("%s not published: %s", what, exc)
            return False
        except store_mod.StoreError as exc:
            log.warning("%s not published: %s", what, exc)
            return False
        return True
