"""The leader election on a real store file: one elector leads at a time, a leader that
dies is replaced with a larger fencing token (its late writes refused), and a leader whose
store stops answering steps down before its lease can run out, then leads again; and who
leads is shown, and the leader reconciles, without a stalled database holding the replica up;
a follower shows the hold its leader published; a new leader sends and serves the version a
halted rollout keeps."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pathlib
import sqlite3
import threading
import time
import types
from collections.abc import Callable

import httpx

from orchestrator import following, leadership, server
from orchestrator.agents import relay
from orchestrator.gateway import endpoints as endpoints_mod
from orchestrator.gateway import routing, wire
from orchestrator.reconciler import loop
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.store.threads import StoreThreads
from orchestrator.testing import harness, manifests, onnx_models, stall
from orchestrator.testing.postgres import PostgresServer
from tests.foundation import support

TTL_S = 1.0


class Replica:
    """An elector with a log of what it was told, as the control plane would act on it."""

    def __init__(self, path: pathlib.Path, name: str):
        self.store = open_store(path)
        self.gains: list[store_mod.Lease] = []
        self.losses: list[tuple[float, str]] = []  # (wall time, reason)
        self.elector = leadership.Elector(self.store, name, TTL_S, self.gains.append,
                                          lambda reason: self.losses.append((time.time(), reason)))
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Replica:
        self.task = asyncio.create_task(self.elector.run())
        return self

    async def kill(self) -> None:
        """Dies without giving the lease up (as with kill -9)."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# What these tests time their moves by, read from private fields: nothing public shows the
# lease call an elector waits on, nor holds a publish of the table as a slow write would,
# and a control plane steps down only when its own lease runs out.
def lease_call(elector: leadership.Elector) -> asyncio.Future[store_mod.Lease | None] | None:
    """The store call for the lease that ``elector`` waits on, once it has asked one."""
    return None if elector._attempt is None else elector._attempt[1]


def publishing(reconciler: loop.Reconciler) -> asyncio.Lock:
    """The lock a publish of ``reconciler``'s endpoint table holds while it is written."""
    return reconciler.publisher._publishing


def lose_lead(deposed: object, reason: str) -> None:
    """What a control plane does as it steps down, on ``deposed`` (the parts of it the step uses)."""
    server.ControlPlane._lose_lead(deposed, reason)  # type: ignore[arg-type]


async def until(what: str, check: Callable[[], object], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {within_s}s"
        await asyncio.sleep(0.01)


def test_one_elector_leads_and_a_dead_leader_is_replaced_with_a_larger_token(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        a, b = Replica(tmp_path / "state.db", "a").start(), Replica(tmp_path / "state.db", "b").start()
        try:
            await until("a leader", lambda: a.elector.leading or b.elector.leading)
            for _ in range(50):  # over a few renewals: never two leaders
                assert a.elector.leading != b.elector.leading
                await asyncio.sleep(TTL_S / 25)
            leader, other = (a, b) if a.elector.leading else (b, a)
            old = leader.gains[-1]
            await leader.kill()
            await until("the other took over", lambda: other.elector.leading)
            new = other.gains[-1]
            assert new.token == old.token + 1 and new.holder == other.elector.holder
            assert other.elector.changes == 1 and not other.losses
            try:
                leader.store.replace_placements([store_mod.PlacementRow("d", "s", "v", 1)], lease=old)
            except store_mod.Fenced:
                pass
            else:
                raise AssertionError("the dead leader's write of intent was not fenced")
            await other.kill()
            other.elector.release()  # a clean stop frees the lease at once
            assert other.store.current_lease(leadership.LEASE) is None
        finally:
            for r in (a, b):
                await r.kill()
                r.store.close()

    asyncio.run(main())


def test_a_leader_whose_store_stops_answering_steps_down_before_its_lease_ends(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        path = tmp_path / "state.db"
        a = Replica(path, "a").start()
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            await until("a leads", lambda: a.elector.leading)
            blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database: renewals cannot land
            try:
                await until("a stepped down", lambda: a.losses, within_s=TTL_S * 10)
                lease_row = blocker.execute("SELECT holder, token, expires_at FROM leases").fetchone()
            finally:
                blocker.execute("ROLLBACK")
            stepped_down_at, reason = a.losses[0]
            assert "no answer in time" in reason or "ran out" in reason, reason
            assert lease_row[0] == "a" and stepped_down_at < lease_row[2]  # before the lease could have passed to anyone
            await until("a leads again", lambda: a.elector.leading)
            assert [g.token for g in a.gains] == [1, 1]  # nobody else held it in between: the same token
            assert a.elector.changes == 3
        finally:
            await a.kill()
            blocker.close()
            a.store.close()

    asyncio.run(main())


class GatedStore:
    """A store whose every lease call waits for the test to let it answer."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.run_first = StoreThreads().run_first

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> store_mod.Lease:
        assert self.gate.wait(10), "the test never let the call answer"
        self.gate.clear()
        return store_mod.Lease(name, holder, 1, ttl_s)


def test_a_cancel_that_comes_as_the_store_answers_ends_the_campaign() -> None:
    """On Python 3.11 ``asyncio.wait_for`` returns the answer and drops a cancel that comes in
    the same turn of the loop; a campaign waiting that way would never end (a stop would hang)."""

    async def main() -> None:
        store = GatedStore()
        elector = leadership.Elector(store, "a", TTL_S, lambda lease: None, lambda reason: None)
        task = asyncio.create_task(elector.run())
        await until("the first call", lambda: lease_call(elector) is not None)
        await asyncio.sleep(0.02)  # the elector waits for the answer
        lease_call(elector).add_done_callback(lambda _: task.cancel())  # type: ignore[union-attr]  # in the turn the answer comes
        store.gate.set()
        done, _ = await asyncio.wait((task,), timeout=5)
        assert done, "the campaign went on after it was cancelled"
        assert task.cancelled()

    asyncio.run(main())


def _table_at(site: str) -> endpoints_mod.EndpointTable:
    table = endpoints_mod.EndpointTable()
    table.replace([routing.Endpoint("m", "d", site, "edge", "FR", "eu-west", 0.0, 0.0, f"http://{site}.test:8081")])
    return table


def test_an_endpoint_table_queued_before_the_lease_was_lost_is_fenced(tmp_path: pathlib.Path) -> None:
    """A leader that steps down still has a publish of its endpoint table queued behind a slow
    one (a slow database is what costs a leader its lease). It must be refused once another
    replica leads, not written over the new leader's table: followers and standalone gateways
    route from that table, and the new leader writes it again only when its own changes."""
    clock = [1_000_000.0]
    a_store = store_mod.Store(tmp_path / "state.db", clock=lambda: clock[0])
    b_store = store_mod.Store(tmp_path / "state.db", clock=lambda: clock[0])

    async def main() -> None:
        a_lease = a_store.acquire_lease("leader", "a", 10.0)
        assert a_lease is not None
        reconciler = loop.Reconciler(a_store, None, None, None, _table_at("old-site"), lease=a_lease)  # type: ignore[arg-type]
        await publishing(reconciler).acquire()  # an earlier publish is still being written
        reconciler.publisher.table_changed()
        await asyncio.sleep(0)
        deposed = types.SimpleNamespace(reconciler=reconciler, _reconciling=None, _relay_secret="x",
                                        relay_servicer=types.SimpleNamespace(close_all=lambda: None),
                                        hub=types.SimpleNamespace(drop_relayed=lambda: None))
        lose_lead(deposed, "the lease ran out before it was renewed")

        clock[0] += 11  # a's lease runs out; b leads and publishes its table
        b_lease = b_store.acquire_lease("leader", "b", 10.0)
        assert b_lease is not None and b_lease.token > a_lease.token
        b_table = wire.contents_to_text(wire.contents_of(_table_at("new-site")))
        b_store.publish(wire.PUBLISHED_KEY, b_table, lease=b_lease)

        publishing(reconciler).release()  # the slow write ends: a's queued publish runs
        await reconciler.publishes_done(timeout=5)
        published = b_store.published(wire.PUBLISHED_KEY)
        assert published is not None and published[1] == b_table, "the deposed leader's table replaced the new leader's"

    try:
        asyncio.run(main())
    finally:
        a_store.close()
        b_store.close()


async def test_the_leadership_view_on_a_stalled_database_holds_up_no_other_request(tmp_path: pathlib.Path,
                                                                                   postgres: PostgresServer) -> None:
    """``edgeplane status`` asks who leads while the database is stalled (its server process
    stopped here; a frozen VM alike): the replica goes on answering, and the view answers
    within a lease time, saying the store did not."""
    fleet = harness.Fleet(tmp_path)
    try:
        # no pass while the database is stopped: this test is about the view alone
        cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0)
        assert cp.elector is not None  # a shared database: leadership by the lease
        await cp.reconciler.wait_for_pass(0)
        pid = cp.store.backend_pid
        assert pid
        answered = threading.Event()
        ttl_s = cp.elector.ttl_s

        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            with stall.stalled(pid) as database:

                def resume_unless_answered() -> None:  # the views answer by themselves, within a lease time
                    if not answered.wait(10 * ttl_s):  # far past it: views that waited for the database show
                        database.resume()

                probing = stall.probe([f"{cp.http_url}/v2/health/live"], within=2, then=resume_unless_answered)
                asked = time.monotonic()
                views = await asyncio.gather(*(http.get("/v1/controlplane") for _ in range(3)))
                took = time.monotonic() - asked
                answered.set()
                [live] = await probing
            resumed = await http.get("/v1/controlplane")
        assert live == 200, "the liveness probe got no answer while GET /v1/controlplane waited on the database"
        assert took < 5 * ttl_s, f"the views answered in {took:.1f} s, waiting for the database ({ttl_s:g} s lease)"
        for view in views:
            assert view.status_code == 200 and view.json()["leader"] is None, view.text
            assert view.json()["error"] == f"the store did not answer in {cp.elector.ttl_s:g} s"
        assert resumed.status_code == 200 and "error" not in resumed.json(), resumed.text
    finally:
        await fleet.stop()


async def test_a_scrape_on_a_stalled_database_answers_without_the_placement(tmp_path: pathlib.Path,
                                                                          postgres: PostgresServer) -> None:
    """Prometheus scrapes /metrics while the database is stalled: every scrape answers within
    a few seconds, without ``edgeplane_replicas_placed`` (the rest of the families there), and
    however many come, they park one worker thread between them, not the pool that the
    artifact reads, capture writes and joins share. Once the database is back, it is counted again."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0)
        await cp.reconciler.wait_for_pass(0)
        pid = cp.store.backend_pid
        assert pid
        scrapes = min(32, (os.cpu_count() or 1) + 4) + 2  # more than asyncio's default pool has threads
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=server.API_READ_S + 5) as http:
            with stall.stalled(pid):
                answers = await asyncio.gather(*(http.get("/metrics") for _ in range(scrapes)))
                views = await asyncio.gather(*(http.get("/v1/placements") for _ in range(scrapes)))
                # the database stays stalled until this ends: a thread parked on it would free up only then
                free = await asyncio.wait((asyncio.ensure_future(asyncio.to_thread(lambda: None)),), timeout=30)
            resumed = await http.get("/metrics")
        for answer in answers:
            assert answer.status_code == 200 and "edgeplane_agents" in answer.text, answer.text[:200]
            assert "edgeplane_replicas_placed" not in answer.text
        for view in views:  # get placements too: a 503 to retry, sharing the one read
            assert view.status_code == 503 and "did not answer" in view.json()["error"], view.text[:200]
        assert free[0], "no worker thread freed up in 30 s while scrapes waited on the stalled database"
        assert resumed.status_code == 200 and "edgeplane_replicas_placed" in resumed.text
    finally:
        await fleet.stop()


async def test_a_database_that_stalls_as_it_grants_the_lease_holds_up_no_other_request(tmp_path: pathlib.Path,
                                                                                       postgres: PostgresServer) -> None:
    """A replica that gains the lease publishes where to relay and logs its election; with
    the database stalled right after the grant, the rest of the replica goes on answering."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0)
        elector = cp.elector
        assert elector is not None
        await cp.reconciler.wait_for_pass(0)
        pid = cp.store.backend_pid
        assert pid
        grant, stalled, database = cp.store.acquire_lease, threading.Event(), stall.Stall(pid)
        steps = iter(("taken", "stall"))

        def acquire_lease(name: str, holder: str, ttl_s: float) -> store_mod.Lease | None:
            step = next(steps, None)
            if step == "taken":  # as if another replica held the lease: this one steps down, then leads again
                return None
            lease = grant(name, holder, ttl_s)
            if step == "stall":  # the database stops as its grant comes back
                database.stop()
                stalled.set()
            return lease

        cp.store.acquire_lease = acquire_lease  # type: ignore[method-assign]
        with database:  # the probe waits for the stall; the replica then takes up the lead
            [live] = await stall.probe([f"{cp.http_url}/v2/health/live"], within=2, once=stalled, then=database.resume)
        assert stalled.is_set() and live == 200, "the liveness probe got no answer while the new leader waited on the database"
        # and once the database is back, the replica leads: its relay address published under its lease
        await harness.wait_until(lambda: elector.lease is not None and cp.reconciler.lease is not None
                                 and cp.reconciler.lease.token == elector.lease.token, 30, what="the replica to lead again")
    finally:
        await fleet.stop()


async def test_a_leader_publishes_that_it_answers_the_followers_claims(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """A follower asks the leader before giving a site a new identity only when the leader's
    relay document says it answers (one of an earlier release would leave it unanswered)."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0)
        await harness.wait_until(lambda: cp.reconciler.lease is not None, 30, what="the replica to lead")
        published = await cp.store.run(cp.store.published, following.LEADER_KEY)
        assert published is not None
        leader = relay.Leader.from_json(published[1])
        assert leader.replica == cp.replica_id and leader.answers_claims
    finally:
        await fleet.stop()


async def test_a_follower_shows_the_hold_its_leader_published_and_its_end(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """A follower runs no pass: why changes to the fleet are on hold, in its ``GET
    /v1/controlplane`` and ``edgeplane status``, is what the leader published, and it stops
    saying so once the leader's pass finds every object readable again."""
    async with harness.leader_and_follower(tmp_path, postgres.create_database()) as (leading, following):
        leader, follower = leading.cp, following.cp
        assert leader is not None and follower is not None
        legacy = {"variants": [{"name": "v", "runtime": "ray-serve", "importPath": "pkg.mod:app", "throughputRps": 1e-320,
                                "resources": {"cpu": 1, "memoryMiB": 256}}]}  # a throughput this version refuses even stored
        await leader.store.run(leader.store.apply, [store_mod.ObjectWrite("Model", "old", {}, legacy)],
                               store_mod.Event("earlier-version", "apply", "", "", "apply"))
        leader.reconciler.trigger("test")
        async with httpx.AsyncClient(base_url=follower.http_url, timeout=30) as http:

            async def follower_view(held: bool) -> dict[str, object]:
                for _ in range(300):  # the leader's next pass publishes it
                    view: dict[str, object] = (await http.get("/v1/controlplane")).json()
                    if ("hold" in view) == held:
                        return view
                    await asyncio.sleep(0.1)
                raise AssertionError(f"the follower's view never {'showed' if held else 'stopped showing'} the hold: {view}")

            view = await follower_view(held=True)
            assert view["role"] == "follower", view
            hold = view["hold"]
            assert isinstance(hold, str) and hold.startswith("changes on hold: Model 'old' cannot be read (variants.0.throughputRps"), view
            assert hold.endswith(": apply it again or delete it")
            shown = await asyncio.to_thread(support.cli, "status", server_url=follower.http_url)
            assert shown.returncode == 0 and hold in shown.stdout.splitlines(), (shown.stdout, shown.stderr)
            shown = await asyncio.to_thread(support.cli, "status", "-o", "json", server_url=follower.http_url)
            assert shown.returncode == 0 and json.loads(shown.stdout)["controlPlane"]["hold"] == hold, shown.stderr

            assert (await http.delete("/v1/models/old")).status_code == 200  # through the follower: the leader's next pass reads it
            await follower_view(held=False)
            shown = await asyncio.to_thread(support.cli, "status", server_url=follower.http_url)
            assert shown.returncode == 0 and "changes on hold" not in shown.stdout, shown.stdout


async def test_a_pass_on_a_stalled_database_holds_up_no_other_request(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """The leader's reconcile pass starts while the database is stalled: the pass waits for
    it, the rest of the replica (its health probes, its API) goes on answering, and the pass
    ends once the database is back."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(store=postgres.create_database(), resync_s=3600.0)
        assert cp.elector is not None
        done = await cp.reconciler.wait_for_pass(0)
        pid = cp.store.backend_pid
        assert pid

        passes_while_stalled: list[int] = []

        with stall.stalled(pid) as database:

            def resume() -> None:  # the pass has waited on the database all along: none ended meanwhile
                passes_while_stalled.append(cp.reconciler.passes)
                database.resume()

            cp.reconciler.trigger("a pass on a stalled database")
            answers = await stall.probe([f"{cp.http_url}/v2/health/live", f"{cp.http_url}/healthz"], within=2, then=resume)
        assert answers == [200, 200], f"liveness probe, API health: {answers} while the pass waited on the database"
        assert passes_while_stalled == [done], "the pass did not wait on the stalled database"
        assert await cp.reconciler.wait_for_pass(done) > done  # and the database back, the pass ends
    finally:
        await fleet.stop()


async def test_a_renewal_on_a_stalled_database_is_not_queued_behind_the_backlog(postgres: PostgresServer) -> None:
    """A fleet rejoins and callers read the API while the database stalls: their calls queue on
    the store's threads. The leader's renewal asked meanwhile lands as soon as the database
    answers, after the one call that had the connection, not after the whole backlog: a backlog
    long enough to drain past the lease would otherwise cost the fleet its leader."""
    store = open_store(postgres.create_database())
    done: list[str] = []  # in the order the calls end, as their threads see it
    grant = store.acquire_lease

    def acquire_lease(name: str, holder: str, ttl_s: float) -> store_mod.Lease | None:
        lease = grant(name, holder, ttl_s)
        done.append("lease")
        return lease

    def read() -> None:  # as a join or an API read
        store.list("Site")
        done.append("read")

    store.acquire_lease = acquire_lease  # type: ignore[method-assign]
    elector = leadership.Elector(store, "a", 3.0, lambda lease: None, lambda reason: None)
    task = asyncio.create_task(elector.run())
    try:
        await until("a leads", lambda: elector.leading)
        assert store.backend_pid
        with stall.stalled(store.backend_pid) as database:
            backlog = [asyncio.ensure_future(store.run(read)) for _ in range(48)]
            done.clear()
            await until("a renewal asked on the stalled database", lambda: lease_call(elector) is not None, within_s=5)
            await asyncio.sleep(0.2)  # the renewal now waits for the connection
            database.resume()
            await asyncio.wait_for(asyncio.gather(*backlog), 30)
        await until("the renewal", lambda: "lease" in done, within_s=5)
        assert done.index("lease") <= 1, f"the renewal waited for {done.index('lease')} calls queued before it"
        assert elector.leading and elector.changes == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()


async def test_a_new_leader_sends_and_serves_the_version_a_halted_rollout_keeps(tmp_path: pathlib.Path,
                                                                                   postgres: PostgresServer) -> None:
    """After a failover mid-rollout, the sites a halted rollout keeps on the old version (named
    by no stored Model any more) are sent it from the new leader, which serves it: an agent
    that lost its cache downloads it there, not from the leader that is gone."""
    art, sites = tmp_path / "art", {"edge-a": 48.0, "edge-b": 49.0}
    old = onnx_models.build_mlp(art / "old.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    broken = b"not an onnx model" * 64
    (art / "broken.onnx").write_bytes(broken)

    def fleet(uri: str, sha256: str) -> str:
        return manifests.bundle(*(manifests.edge_site(n, "FR", lat, 2.35) for n, lat in sites.items()),
                                manifests.onnx_model("intent", uri, sha256), manifests.doc("ModelDeployment", "intent-fr", {
                                    "model": "intent", "replicas": {"min": 2, "max": 2}, "rollout": {"maxUnavailable": 1},
                                    "placement": {"residency": ["FR"], "tiers": ["edge"], "spread": {"by": "site", "maxSkew": 1}}}))

    def urls_sent(cp: server.ControlPlane) -> set[str]:
        return {x.artifact_url for s in sites if (got := cp.hub.assignments(s)) is not None for x in got.assignments
                if x.sha256 == old.sha256}

    async with harness.leader_and_follower(tmp_path, postgres.create_database(), both={"artifact_roots": (art,)}) as (fa, fb):
        a, b = fa.cp, fb.cp
        assert a is not None and b is not None
        async with httpx.AsyncClient(base_url=a.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=fleet("old.onnx", old.sha256))).status_code == 200
            for site, lat in sites.items():  # the agents are connected to the follower, and stay with it
                await fb.start_agent(site, country="FR", lat=lat, lon=2.35)

            def serving_old(cp: server.ControlPlane) -> bool:
                return all((st := cp.hub.status(s)) is not None and (m := st.models.get("intent")) is not None
                           and m.serving_sha256 == old.sha256 for s in sites)
            # as the leader knows it (relayed): a site it knows to serve nothing would get the new version at once
            await harness.wait_until(lambda: serving_old(a), 60, what="the old version served")
            assert (await http.post("/v1/apply", content=fleet("broken.onnx", hashlib.sha256(broken).hexdigest()))).status_code == 200

        def halted() -> bool:
            obj = b.store.get("ModelDeployment", "intent-fr")
            return obj is not None and "halted" in (obj.status or {}).get("rollout", {})
        await harness.wait_until(halted, 60, what="the rollout halted")
        assert {u.split("/v1/")[0] for u in urls_sent(b)} == {a.http_url}

        await fa.stop()
        await harness.wait_until(lambda: b.elector is not None and b.elector.leading and b.reconciler.lease is not None, 30, what="b leads")
        await harness.wait_until(lambda: urls_sent(b) == {f"{b.http_url}/v1/artifacts/{old.sha256}"} or None, 30,
                                 what=f"the kept version sent from the new leader, not {urls_sent(b)}")
        assert halted()
        async with httpx.AsyncClient(timeout=10) as http:
            served = await http.get(f"{b.http_url}/v1/artifacts/{old.sha256}")
        assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == old.sha256
