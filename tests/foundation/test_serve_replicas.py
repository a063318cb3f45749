"""Several `edgeplane serve` processes on one PostgreSQL store: every replica serves the
API and agents, exactly one (the holder of the leader lease) reconciles, and the others
relay their agents to it; when the leader is killed with -9 another takes over with a
larger fencing token and plans at once with the agent it held, what is applied after the
failover is reconciled, and no acknowledged write is lost."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import time
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.store import open_store
from orchestrator.testing import harness

from . import support
from orchestrator.testing.postgres import PostgresServer

LEASE_S = 2.0
SITE = "edge-lyon"
MODEL = "intent-classifier"
REQUEST = support.REPO / "manifests" / "examples" / "requests" / f"{MODEL}.json"


def view(replica: support.ServeProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{replica.url}/v1/controlplane", timeout=10).json())


def leaders(replicas: list[support.ServeProcess]) -> list[str]:
    return [v["replica"] for v in map(view, replicas) if v["role"] == "leader"]


def wait_for(what: str, check: Any, within_s: float, every_s: float = 0.05) -> Any:
    """Polls ``check`` until it returns something truthy (bounded in time)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {within_s}s")


def metric(replica: support.ServeProcess, name: str) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def deployment(name: str, max_replicas: int) -> str:
    doc = {"apiVersion": support.API_VERSION, "kind": "ModelDeployment", "metadata": {"name": name},
           "spec": {"model": "doc-fields", "variant": "distilled", "replicas": {"min": 1, "max": max_replicas},
                    "placement": {"residency": ["FR"]}}}
    return yaml.safe_dump(doc)


def observed(replica: support.ServeProcess, name: str) -> tuple[int, int] | None:
    """(generation, observedGeneration) of a ModelDeployment: the leader writes the latter."""
    r = httpx.get(f"{replica.url}/v1/modeldeployments/{name}", timeout=10)
    if r.status_code != 200:
        return None
    doc = r.json()
    return doc["metadata"]["generation"], doc.get("status", {}).get("observedGeneration", 0)


def endpoints(replica: support.ServeProcess) -> list[dict[str, Any]]:
    return list(httpx.get(f"{replica.url}/v1/endpoints/{MODEL}", timeout=10).json()["endpoints"])


def agent_joins(url: str, after_event: int) -> list[Any]:
    """The agent's joins at SITE logged after event ``after_event`` (a replica logs those it takes)."""
    store = open_store(url)
    try:
        return [e for e in store.events(since=after_event, limit=10_000) if e.action == "agent-joined" and e.name == SITE]
    finally:
        store.close()


def start_replicas(tmp_path: pathlib.Path, fleet: pathlib.Path, urls: list[str], *extra: str,
                   insecure_agents: bool = True) -> list[support.ServeProcess]:
    """One replica per store URL (the same database, reached directly or through a proxy)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tls = ("--insecure-agents",) if insecure_agents else ()
    replicas = [support.ServeProcess(tmp_path / f"cp-{i}", "--store", url, "--leader-lease", str(LEASE_S), *tls,
                                     "--bootstrap-token", harness.BOOTSTRAP_TOKEN, "--heartbeat-interval", "0.5", *extra,
                                     artifact_root=fleet)
                for i, url in enumerate(urls)]
    try:
        for r in replicas:
            r.wait_ready()
    except BaseException:
        for r in replicas:
            r.stop()
        raise
    return replicas


def the_leader(replicas: list[support.ServeProcess]) -> support.ServeProcess:
    elected = wait_for("a leader elected", lambda: leaders(replicas), within_s=30)
    assert len(elected) == 1, elected
    return next(r for r in replicas if view(r)["replica"] == elected[0])


def test_one_replica_leads_and_a_killed_leader_is_replaced_with_a_larger_fencing_token(
    tmp_path: pathlib.Path, offline_fleet: pathlib.Path, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    replicas = start_replicas(tmp_path, offline_fleet, [url, url])
    agent: harness.AgentProcess | None = None
    try:
        elected = wait_for("a leader elected", lambda: leaders(replicas), within_s=30)
        assert len(elected) == 1, elected  # exactly one leads
        leader = next(r for r in replicas if view(r)["replica"] == elected[0])
        follower = next(r for r in replicas if r is not leader)
        before = view(follower)
        assert before["role"] == "follower" and before["leader"]["replica"] == elected[0], before
        assert before["storeChanges"] == {"notified": True, "pollSeconds": 1.0}, before  # other replicas' writes, as they commit
        token = before["leader"]["fencingToken"]
        assert metric(leader, "edgeplane_leader") == 1 and metric(follower, "edgeplane_leader") == 0
        assert metric(leader, "edgeplane_leader_changes_total") == 1

        # writes through the follower land in the shared store; the leader reconciles them
        applied = support.cli("apply", "-f", str(offline_fleet), server_url=follower.url)
        assert applied.returncode == 0, applied.stderr
        put = support.cli("apply", "-f", "-", server_url=follower.url, stdin=deployment("before", 2))
        assert put.returncode == 0, put.stderr
        wait_for("the leader reconciled an apply made through the follower", lambda: (o := observed(follower, "before")) and o[0] == o[1],
                 within_s=60, every_s=0.2)
        status = support.cli("status", server_url=follower.url)
        assert status.returncode == 0, status.stderr
        assert f"follower; leader {elected[0]} (fencing token {token})" in status.stdout, status.stdout
        as_json = json.loads(support.cli("status", "-o", "json", server_url=leader.url).stdout)
        assert as_json["controlPlane"]["role"] == "leader" and as_json["controlPlane"]["leader"]["fencingToken"] == token

        # an agent given both addresses, the follower's first: it stays there, relayed to the leader
        addresses = ",".join(f"127.0.0.1:{r.agent_port}" for r in (follower, leader))
        agent = harness.spawn_agent(harness.agent_command(addresses, SITE, tmp_path / "agent", heartbeat_interval=0.5), SITE,
                                    tmp_path / "agent")
        joins = wait_for("the leader logged the agent's join", lambda: agent_joins(url, 0), within_s=60, every_s=0.2)
        assert len(joins) == 1, joins  # logged once, by the replica the agent is connected to
        assert "does not lead" not in agent.log(), agent.log()
        wait_for("the follower relays one agent", lambda: (v := view(follower))["agents"]["connected"] == 1
                 and v["relay"]["connected"] and v["relay"]["leader"] == elected[0], within_s=30, every_s=0.1)
        # the relay may have connected before the agent joined: its report follows within a flush
        wait_for("the leader holds the relayed agent", lambda: view(leader)["agents"] == {"connected": 0, "relayedHere": 1},
                 within_s=10, every_s=0.05)
        assert "; 1 agent here, relayed to the leader" in support.cli("status", server_url=follower.url).stdout
        assert "; 0 agents here, 1 relayed by followers" in support.cli("status", server_url=leader.url).stdout
        wait_for("the leader saw the site healthy", lambda: httpx.get(f"{follower.url}/v1/sites/{SITE}", timeout=10).json()
                 .get("status", {}).get("health") == "Healthy", within_s=60, every_s=0.2)

        # both gateways route from the table the leader published, to the agent it planned
        routed = wait_for("the leader routes to the agent", lambda: (e := endpoints(leader)) and e, within_s=120, every_s=0.2)
        wait_for("the follower routes from the leader's table", lambda: endpoints(follower) == routed, within_s=30, every_s=0.2)
        answer = support.cli("infer", MODEL, "--location", "45.7,4.8", "--data", f"@{REQUEST}", server_url=follower.url)
        assert answer.returncode == 0 and SITE in answer.stdout + answer.stderr, (answer.stdout, answer.stderr)
        store = open_store(url)
        try:
            acknowledged = support.desired_state(store)
        finally:
            store.close()

        os.killpg(leader.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        after = wait_for("the follower took over", lambda: (v := view(follower))["role"] == "leader" and v, within_s=5.0, every_s=0.02)
        print(f"\nfailover after kill -9 of the leader: {time.monotonic() - killed:.2f}s (leader lease {LEASE_S:g}s)")
        assert after["leader"]["replica"] == after["replica"] and after["leader"]["fencingToken"] > token, after
        assert metric(follower, "edgeplane_leader") == 1

        # nothing acknowledged was lost, and the new leader reconciles what comes next
        store = open_store(url)
        try:
            assert support.desired_state(store) == acknowledged
            elected_events = [e for e in store.events(limit=10_000) if e.action == "leader-elected"]
            assert [e.details["fencingToken"] for e in elected_events] == [token, after["leader"]["fencingToken"]]
        finally:
            store.close()
        # the new leader held the agent already: it plans with it at once, and the agent never moved
        wait_for("the new leader routes to the agent", lambda: endpoints(follower), within_s=30, every_s=0.2)
        assert agent_joins(url, elected_events[-1].id) == [] and view(follower)["agents"] == {"connected": 1, "relayedHere": 0}
        answer = support.cli("infer", MODEL, "--location", "45.7,4.8", "--data", f"@{REQUEST}", server_url=follower.url)
        assert answer.returncode == 0 and SITE in answer.stdout + answer.stderr, (answer.stdout, answer.stderr)
        put = support.cli("apply", "-f", "-", server_url=follower.url, stdin=deployment("before", 3))  # generation 2
        assert put.returncode == 0 and "configured" in put.stdout, put.stdout + put.stderr
        wait_for("the new leader reconciled an apply made after the failover",
                 lambda: observed(follower, "before") == (2, 2), within_s=60, every_s=0.2)
    finally:
        if agent is not None:
            agent.stop()
        for r in replicas:
            r.stop()


def test_a_paused_leader_is_replaced_and_steps_down_when_it_resumes(
    tmp_path: pathlib.Path, offline_fleet: pathlib.Path, postgres: PostgresServer
) -> None:
    """SIGSTOP stands for a leader cut off (a long pause, a partition): the other replica
    takes over with a larger token; the old leader, resumed, finds its lease gone and
    follows; there is one leader throughout."""
    url = postgres.create_database()
    support.shared_agent_ca(tmp_path / "one", tmp_path / "two")
    replicas = [support.ServeProcess(tmp_path / name, "--store", url, "--leader-lease", str(LEASE_S), artifact_root=offline_fleet)
                for name in ("one", "two")]
    try:
        for r in replicas:
            r.wait_ready()
        elected = wait_for("a leader elected", lambda: leaders(replicas), within_s=30)
        leader = next(r for r in replicas if view(r)["replica"] == elected[0])
        follower = next(r for r in replicas if r is not leader)
        token = view(follower)["leader"]["fencingToken"]
        applied = support.cli("apply", "-f", str(offline_fleet), server_url=follower.url)
        assert applied.returncode == 0, applied.stderr
        os.killpg(leader.process.pid, signal.SIGSTOP)
        try:
            after = wait_for("the other took over", lambda: (v := view(follower))["role"] == "leader" and v, within_s=30)
            assert after["leader"]["fencingToken"] == token + 1
        finally:
            os.killpg(leader.process.pid, signal.SIGCONT)
        resumed = wait_for("the resumed leader follows", lambda: (v := view(leader))["role"] == "follower" and v, within_s=30)
        assert resumed["leader"]["replica"] == after["replica"] and resumed["leader"]["fencingToken"] == token + 1
        assert leaders(replicas) == [after["replica"]]
        assert "no longer leading" in leader.log() or "not written" in leader.log(), leader.log()
    finally:
        for r in replicas:
            r.stop()


def test_replicas_with_different_agent_cas_say_so_and_relay_over_mutual_tls_once_they_share_one(
    tmp_path: pathlib.Path, offline_fleet: pathlib.Path, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    for i in range(2):  # each its own CA (a replica given none while the store knows one is refused)
        assert support.cli("ca", "init", str(tmp_path / f"cp-{i}" / "ca")).returncode == 0
    replicas = start_replicas(tmp_path, offline_fleet, [url, url], insecure_agents=False)
    try:
        leader = the_leader(replicas)
        follower = next(r for r in replicas if r is not leader)
        relay_view = wait_for("the follower names the CA mismatch", lambda: (v := view(follower).get("relay")) and v["lastError"]
                              and "agent CA" in v["lastError"] and v, within_s=15)
        assert not relay_view["connected"] and "copy <data-dir>/ca" in relay_view["lastError"], relay_view
        status = support.cli("status", server_url=follower.url)
        assert status.returncode == 0 and "not relayed (this replica's agent CA" in status.stdout, status.stdout + status.stderr
        assert "Traceback" not in follower.log() and "is not the one of the leader" in follower.log()

        # the operator copies the leader's CA to the follower and restarts it: the relay connects over mutual TLS
        assert follower.stop() == 0
        replicas.remove(follower)
        shutil.rmtree(follower.data_dir / "ca")
        shutil.copytree(leader.data_dir / "ca", follower.data_dir / "ca")
        restarted = support.ServeProcess(follower.data_dir, "--store", url, "--leader-lease", str(LEASE_S), "--bootstrap-token",
                                         harness.BOOTSTRAP_TOKEN, "--heartbeat-interval", "0.5", artifact_root=offline_fleet)
        replicas.append(restarted)
        restarted.wait_ready()
        wait_for("the relay connected over mutual TLS", lambda: (v := view(restarted).get("relay")) and v["connected"], within_s=15)
        assert view(restarted)["role"] == "follower"
    finally:
        for r in replicas:
            r.stop()


def test_a_request_through_a_follower_wakes_a_model_scaled_to_zero(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    """A follower runs no reconciler: it leaves the wake in the store, the leader starts a
    replica, and the follower answers the request that asked once the table has it. Each
    step reaches the other replica by the store's notifications (the replicas' own reads
    are a minute apart): the apply and the wake to the leader, its table to the follower."""
    import numpy as np

    from edgeplane_proto import oip
    from orchestrator.testing import manifests, onnx_models

    root = tmp_path / "artifacts"
    built = onnx_models.build_mlp(root / "lazy.onnx", in_dim=8, hidden=16, out_dim=4, seed=4)
    fleet = manifests.bundle(
        manifests.edge_site("edge-paris", country="FR", lat=48.8566, lon=2.3522),
        manifests.onnx_model("lazy", "lazy.onnx", built.sha256),
        manifests.doc("ModelDeployment", "lazy-fr", {"model": "lazy", "replicas": {"min": 0, "max": 1},
                                                     "placement": {"residency": ["FR"], "tiers": ["edge"]},
                                                     "autoscaling": {"targetRps": 10, "scaleDownDelaySeconds": 1}}))
    url = postgres.create_database()
    # reads on a schedule only once a minute: what the replicas write reaches each other by notification
    replicas = start_replicas(tmp_path / "cp", root, [url, url], "--store-poll", "60")
    agent: harness.AgentProcess | None = None
    try:
        elected = wait_for("a leader elected", lambda: leaders(replicas), within_s=30)
        follower = next(r for r in replicas if view(r)["replica"] != elected[0])
        applied = support.cli("apply", "-f", "-", server_url=follower.url, stdin=fleet)
        assert applied.returncode == 0, applied.stderr
        addresses = ",".join(f"127.0.0.1:{r.agent_port}" for r in replicas)
        agent = harness.spawn_agent(harness.agent_command(addresses, "edge-paris", tmp_path / "agent", country="FR", lat=48.8566,
                                                          lon=2.3522), "edge-paris", tmp_path / "agent")

        def phase() -> str:
            return str(httpx.get(f"{follower.url}/v1/modeldeployments/lazy-fr", timeout=10).json().get("status", {}).get("phase", ""))

        wait_for("the deployment scaled to zero", lambda: phase() == "ScaledToZero", within_s=60, every_s=0.2)
        wait_for("the follower's table has it cold", lambda: "lazy" in httpx.get(f"{follower.url}/v1/endpoints", timeout=10).json()["table"]["cold"],
                 within_s=30, every_s=0.2)
        body, _ = oip.encode_request({"input": np.full((2, 8), 0.25, dtype=np.float32)})
        resp = httpx.post(f"{follower.url}/v2/models/lazy/infer", content=body, headers={"content-type": "application/json"}, timeout=90)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-edgeplane-site"] == "edge-paris"
        store = open_store(url)
        try:
            woken = [e for e in store.events(limit=10_000, kind="Model") if e.action == "wake-requested"]
        finally:
            store.close()
        assert woken and woken[0].name == "lazy" and woken[0].actor == view(follower)["replica"], woken
    finally:
        if agent is not None:
            agent.stop()
        for r in replicas:
            r.stop()
