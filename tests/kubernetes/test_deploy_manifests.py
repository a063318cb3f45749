"""The Kubernetes install in ``manifests/deploy`` is checked against what it deploys.

No API server runs here, so each document is read into the official ``kubernetes`` client's
typed models and written back: a misspelt or misplaced field is dropped by the model and the
round trip differs. Container arguments are parsed by the real command-line parsers, names
(selectors, ports, Secrets, Services) are checked against each other, and the control
plane's probe paths are asked of a real control plane.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import socket
from typing import Any

import httpx
import kubernetes.client
import pytest
import yaml

from edge_agent import main as agent_main
from edge_agent import uplink
from orchestrator import runloop, server, server_config
from orchestrator.agents import model as agent_model
from orchestrator.cli import main as cli_main
from orchestrator.testing import harness

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "manifests" / "deploy"
DOCS = [(path.name, i, doc) for path in sorted(DEPLOY.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
POD_NAME = "statefulset.kubernetes.io/pod-name"
CONTROL_PLANE = ("StatefulSet", "edgeplane-control-plane")
AGENT = ("DaemonSet", "edgeplane-agent-edge-lyon")
NAMESPACES = {doc["metadata"]["name"]: doc["metadata"].get("labels", {}) for _, _, doc in DOCS if doc["kind"] == "Namespace"}


def pod_names(sts: dict[str, Any]) -> list[str]:
    return [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, _, doc in DOCS if doc["kind"] == kind]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def model_name(doc: dict[str, Any]) -> str:
    version = doc["apiVersion"].split("/")[-1]
    return version[0].upper() + version[1:] + doc["kind"]


@pytest.mark.parametrize("name,index,doc", DOCS, ids=[f"{n}#{i}-{d['kind']}" for n, i, d in DOCS])
def test_each_document_is_a_valid_kubernetes_object(name: str, index: int, doc: dict[str, Any]) -> None:
    api = kubernetes.client.ApiClient()
    typed = api._ApiClient__deserialize(doc, model_name(doc))  # type: ignore[attr-defined]
    assert api.sanitize_for_serialization(typed) == doc, f"{name} document {index}: a field the {doc['kind']} model does not know"
    if doc["kind"] != "Namespace" and doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
        assert doc["metadata"].get("namespace") in NAMESPACES, f"{name} document {index} is outside the namespaces namespace.yaml makes"


#: What the Pod Security levels refuse (kubernetes.io/docs/concepts/security/pod-security-standards),
#: the fields these manifests could set: ``baseline`` first, then what ``restricted`` adds.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                         "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def pod_security_refusals(pod: dict[str, Any], level: str) -> list[str]:
    """Why Pod Security at ``level`` (privileged, baseline, restricted) refuses the pod ``pod``."""
    if level == "privileged":
        return []
    every = [*pod.get("initContainers", []), *pod["containers"]]
    pod_ctx = pod.get("securityContext", {})
    refusals = [f"host namespace {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    refusals += [f"hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    for c in every:
        ctx = c.get("securityContext", {})
        refusals += [f"{c['name']}: hostPort {p['hostPort']}" for p in c.get("ports", []) if p.get("hostPort")]
        refusals += [f"{c['name']}: privileged"] * bool(ctx.get("privileged"))
        refusals += [f"{c['name']}: adds {cap}" for cap in ctx.get("capabilities", {}).get("add", []) if cap not in BASELINE_CAPABILITIES]
        if ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type") == "Unconfined":
            refusals.append(f"{c['name']}: seccomp Unconfined")
        if level != "restricted":
            continue
        if ctx.get("allowPrivilegeEscalation") is not False:
            refusals.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) or ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            refusals.append(f"{c['name']}: may run as root")
        if ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            refusals.append(f"{c['name']}: no seccomp profile")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            refusals.append(f"{c['name']}: capabilities not dropped")
    if level == "restricted":
        refusals += [f"volume {v['name']}: {kind}" for v in pod.get("volumes", [])
                     for kind in v if kind != "name" and kind not in RESTRICTED_VOLUMES]
    return refusals


def test_each_pod_is_admitted_by_its_namespaces_pod_security_and_only_the_agents_need_privileged() -> None:
    """The control plane, the gateways and PostgreSQL run where Pod Security enforces
    ``restricted``; the agents, whose hostPath and hostPort no lower level admits, in a
    namespace of their own that allows ``privileged``."""
    enforced = {ns: labels.get("pod-security.kubernetes.io/enforce") for ns, labels in NAMESPACES.items()}
    assert all(enforced.values()), f"a namespace enforces no Pod Security level: {enforced}"
    for w in [d for kind in WORKLOADS for d in by_kind(kind)]:
        ns, pod = w["metadata"]["namespace"], w["spec"]["template"]["spec"]
        refused = pod_security_refusals(pod, enforced[ns])
        assert not refused, f"{w['metadata']['name']}: namespace {ns} enforces {enforced[ns]}, which refuses {refused}"
        if (w["kind"], w["metadata"]["name"]) == AGENT:
            assert pod_security_refusals(pod, "baseline"), "the agents would run under baseline: their namespace need not be privileged"
        else:
            assert enforced[ns] == "restricted", f"{w['metadata']['name']} runs in {ns}, which enforces {enforced[ns]}"


def test_every_workload_selects_its_own_pods_and_every_service_finds_them() -> None:
    workloads = [d for kind in WORKLOADS for d in by_kind(kind)]
    assert workloads
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
    for svc in by_kind("Service"):
        selector = dict(svc["spec"]["selector"])
        pod = selector.pop(POD_NAME, None)  # set on each pod by the StatefulSet controller
        selected = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                    and (pod is None or (w["kind"] == "StatefulSet" and pod in pod_names(w)))]
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        named = {p["name"] for w in selected for c in containers(w) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named, f"Service {svc['metadata']['name']}: no container port {port['targetPort']!r}"
    for sts in by_kind("StatefulSet"):
        assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind("Service")}


def test_the_gateways_disruption_budget_and_autoscaler_act_on_the_gateway_deployment() -> None:
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    (pdb,) = [b for b in by_kind("PodDisruptionBudget") if b["metadata"]["name"] == "edgeplane-gateway"]
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    gateway = deployments["edgeplane-gateway"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < gateway["spec"]["replicas"]  # a drain can always take one down
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "edgeplane-gateway"}
    assert hpa["spec"]["minReplicas"] == gateway["spec"]["replicas"]
    (c,) = containers(gateway)
    assert "cpu" in c["resources"]["requests"]  # utilisation is measured against the request


def test_probes_name_ports_their_container_has() -> None:
    for w in [d for kind in WORKLOADS for d in by_kind(kind)]:
        for c in containers(w):
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                get = c.get(probe, {}).get("httpGet")
                if get is not None:
                    assert get["port"] in ports, f"{w['metadata']['name']}: {probe} on unknown port {get['port']!r}"
            assert "readinessProbe" in c, f"{w['metadata']['name']}: no readiness probe"


def expand(c: dict[str, Any], node: str = "node-1", host_ip: str = "10.0.0.1") -> list[str]:
    """The container's args as Kubernetes gives them on ``node``: each $(VAR) replaced by the
    container's env, a literal value or the downward API's node fields (others, such as
    $(POD_NAME), are left for the caller); every $(VAR) must be defined in the container."""
    env: dict[str, str | None] = {}
    for e in c.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = e["value"] if "value" in e else {"spec.nodeName": node, "status.hostIP": host_ip}.get(field)

    def value(m: re.Match[str]) -> str:
        assert m[1] in env, f"$({m[1]}) is not in the container's env"
        return env[m[1]] or m[0]
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, a) for a in c["args"]]


def edgeplane_args(kind: str, name: str, node: str = "node-1") -> list[str]:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    (c,) = containers(doc)
    return expand(c, node)


def test_the_control_plane_arguments_are_ones_serve_accepts() -> None:
    args = edgeplane_args(*CONTROL_PLANE)
    parsed = cli_main.build_parser().parse_args(args)
    config = server_config.config_from_args(parsed)
    assert parsed.command == "serve" and parsed.auth == "token" and parsed.host == "0.0.0.0"
    assert parsed.store.startswith("postgresql://") and "@edgeplane-postgres:5432/" in parsed.store
    assert ":" not in parsed.store.split("//")[1].split("@")[0], "the password belongs in a Secret, not in the URL"
    assert config.port == 8080 and config.agent_port == 8081 and config.agent_join_port == 8082


def test_the_agent_arguments_are_ones_the_agent_accepts() -> None:
    args = edgeplane_args(*AGENT)
    parsed = agent_main.parser().parse_args(args)
    assert parsed.listen[1] == 9000 and parsed.advertise_url == "http://10.0.0.1:9000"
    assert parsed.site == "edge-lyon-node-1" and dict(parsed.label) == {"edgeplane.io/site-group": "edge-lyon"}


def test_secrets_the_manifests_read_are_the_ones_the_docs_say_to_create() -> None:
    guide = (DEPLOY.parents[1] / "docs" / "deploy.md").read_text()
    used = {ref["secretKeyRef"]["name"] for _, _, doc in DOCS if doc["kind"] in WORKLOADS
            for c in containers(doc) for e in c.get("env", []) for ref in [e.get("valueFrom", {})] if "secretKeyRef" in ref}
    used |= {v["secret"]["secretName"] for _, _, doc in DOCS if doc["kind"] in WORKLOADS
             for v in doc["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    assert used == {"edgeplane-postgres", "edgeplane-bootstrap-edge-lyon", "edgeplane-gateway-token", "edgeplane-agent-ca"}
    steps = guide.replace("$SITE", "edge-lyon")  # the per-site steps, for the site the file is written for
    for secret in used:
        assert f"create secret generic {secret}" in steps, f"docs/deploy.md does not say how to create {secret}"
    for path in sorted(DEPLOY.glob("*.yaml")):
        assert f"manifests/deploy/{path.name}" in guide, f"docs/deploy.md does not mention {path.name}"


async def test_the_control_plane_answers_its_probe_paths(tmp_path: pathlib.Path) -> None:
    (doc,) = [d for d in by_kind(CONTROL_PLANE[0]) if d["metadata"]["name"] == CONTROL_PLANE[1]]
    (c,) = containers(doc)
    paths = {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in c}
    cp = await server.ControlPlane(server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, agent_join_port=0,
                                                       insecure_agents=True)).start()
    try:
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            for path in sorted(paths):
                assert (await http.get(path)).status_code == 200, path
    finally:
        await cp.stop()


def test_agents_list_every_replica_each_reachable_and_named_in_the_certificate() -> None:
    config = server_config.config_from_args(cli_main.build_parser().parse_args(edgeplane_args(*CONTROL_PLANE)))
    (sts,) = [d for d in by_kind(CONTROL_PLANE[0]) if d["metadata"]["name"] == CONTROL_PLANE[1]]
    dialled = agent_main.parser().parse_args(edgeplane_args(*AGENT)).control_plane.split(",")
    assert len(dialled) == sts["spec"]["replicas"] == 3  # agents find the leader among all of them
    names = server_config.agent_tls_hosts(config)
    assert all(address.rsplit(":", 1)[0] in names for address in dialled)
    exposed = {svc["spec"]["selector"].get(POD_NAME): {p["port"] for p in svc["spec"]["ports"]} for svc in by_kind("Service")}
    for pod in pod_names(sts):  # each replica's agent and join ports, on their own address
        assert exposed.get(pod) == {config.agent_port, config.agent_join_port}, pod


def test_the_control_plane_survives_a_node_drain_and_shares_one_agent_ca() -> None:
    (sts,) = [d for d in by_kind(CONTROL_PLANE[0]) if d["metadata"]["name"] == CONTROL_PLANE[1]]
    (pdb,) = [b for b in by_kind("PodDisruptionBudget") if b["metadata"]["name"] == CONTROL_PLANE[1]]
    assert pdb["spec"]["minAvailable"] < sts["spec"]["replicas"] and pdb["spec"]["minAvailable"] >= 2
    args = cli_main.build_parser().parse_args(edgeplane_args(*CONTROL_PLANE))
    assert 1 <= args.leader_lease <= 30
    (c,) = containers(sts)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    ca = volumes[mounts[f"{args.data_dir}/ca"]]  # the CA every replica signs with: one Secret
    assert ca["secret"]["secretName"] == "edgeplane-agent-ca"


@pytest.mark.parametrize("host,agent_host,public_url,names,expected", [
    ("127.0.0.1", None, None, (), ["127.0.0.1", "localhost"]),
    ("0.0.0.0", None, None, (), ["127.0.0.1", "localhost"]),  # a wildcard is no name to verify
    ("0.0.0.0", "10.1.2.3", None, (), ["10.1.2.3", "127.0.0.1", "localhost"]),
    ("0.0.0.0", None, "http://cp.example.test:8080", (), ["127.0.0.1", "cp.example.test", "localhost"]),
    ("::", None, None, ("agents.example.test", "192.0.2.7"), ["127.0.0.1", "192.0.2.7", "agents.example.test", "localhost"]),
])
def test_agent_tls_hosts(host: str, agent_host: str | None, public_url: str | None, names: tuple[str, ...],
                         expected: list[str]) -> None:
    config = server_config.ServerConfig(data_dir=pathlib.Path("."), host=host, agent_host=agent_host, public_url=public_url,
                                 agent_tls_names=names)
    assert server_config.agent_tls_hosts(config) == expected


def test_the_agent_certificate_names_where_other_replicas_relay_to() -> None:
    """Replicas on one database dial the leader's peer address: its certificate names it,
    given or by default (this host's name, when the agent port listens on all addresses)."""
    replica = server_config.ServerConfig(data_dir=pathlib.Path("."), host="0.0.0.0", store="postgresql://edgeplane@db.example.test/edgeplane")
    assert socket.gethostname() in server_config.agent_tls_hosts(replica)
    given = dataclasses.replace(replica, peer_address="cp-0.pods.example.test:8081")
    assert "cp-0.pods.example.test" in server_config.agent_tls_hosts(given) and socket.gethostname() not in server_config.agent_tls_hosts(given)
    alone = dataclasses.replace(replica, store=None)  # one process: no peers
    assert server_config.agent_tls_hosts(alone) == ["127.0.0.1", "localhost"]


async def test_a_ca_made_by_ca_init_is_the_one_a_replica_signs_with(tmp_path: pathlib.Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "edgeplane-ca"
    assert cli_main.main(["ca", "init", str(shared)]) == 0
    assert (shared / "ca.key").stat().st_mode & 0o777 == 0o600
    assert cli_main.main(["ca", "init", str(shared)]) == 1  # made once: never overwritten
    assert "already holds ca.key and ca.crt" in capsys.readouterr().err
    data_dir = tmp_path / "replica"
    (data_dir / "ca").mkdir(parents=True)
    for name in ("ca.key", "ca.crt"):  # as the Secret mount puts them
        (data_dir / "ca" / name).write_bytes((shared / name).read_bytes())
    cp = await server.ControlPlane(server_config.ServerConfig(data_dir=data_dir, port=0, agent_port=0, agent_join_port=0)).start()
    try:
        assert cp.ca is not None and cp.ca_file is not None
        assert cp.ca_file.read_bytes() == (shared / "ca.crt").read_bytes()
    finally:
        await cp.stop()


def test_each_replica_relays_to_the_leader_at_its_own_pod_name_on_the_agent_port() -> None:
    """--peer-address, expanded by Kubernetes for each pod, names that pod in the
    StatefulSet's headless Service on a port the Service and the container both expose;
    the replica's certificate for agents then names that host too."""
    sts = next(d for d in by_kind(CONTROL_PLANE[0]) if d["metadata"]["name"] == CONTROL_PLANE[1])
    container = containers(sts)[0]
    peer = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--peer-address="))
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    headless = next(s for s in by_kind("Service") if s["metadata"]["name"] == sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    host, port = peer.rsplit(":", 1)
    ns = sts["metadata"]["namespace"]
    assert host == f"$(POD_NAME).{headless['metadata']['name']}.{ns}.svc", peer
    agents = next(p for p in container["ports"] if p["name"] == "agents")
    assert int(port) == agents["containerPort"] and any(p["port"] == int(port) for p in headless["spec"]["ports"])
    for pod in pod_names(sts):
        expanded = peer.replace("$(POD_NAME)", pod)
        cfg = server_config.config_from_args(cli_main.build_parser().parse_args(
            [a.replace("$(POD_NAME)", pod) for a in container["args"]]))
        assert cfg.peer_address == expanded
        assert expanded.rsplit(":", 1)[0] in server_config.agent_tls_hosts(cfg)


async def test_the_control_plane_gateway_asks_a_token_as_the_standalone_gateways_do(tmp_path: pathlib.Path) -> None:
    """The in-cluster Service reaches the control plane's own gateway: its model routes must
    not be an open way around the standalone gateways' token check."""
    (gateway,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "edgeplane-gateway"]
    assert cli_main.build_parser().parse_args(containers(gateway)[0]["args"]).gateway_auth == "token"
    parsed = cli_main.build_parser().parse_args([a.replace("$(POD_NAME)", "edgeplane-control-plane-0")
                                                 for a in edgeplane_args(*CONTROL_PLANE)])
    config = dataclasses.replace(server_config.config_from_args(parsed), data_dir=tmp_path, store=None, host="127.0.0.1",
                                 agent_host="127.0.0.1", port=0, agent_port=0, agent_join_port=0, peer_address=None,
                                 insecure_agents=True)
    cp = await server.ControlPlane(config).start()
    try:
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v2/models/intent/infer", json={"inputs": []})).status_code == 401
            assert (await http.post("/openai/v1/chat/completions", json={"model": "intent", "messages": []})).status_code == 401
            assert (await http.get("/v2/health/live")).status_code == 200  # probes stay open
    finally:
        await cp.stop()


def join_application(args: list[str]) -> agent_model.JoinApplication:
    """What the agent started with ``args`` sends in its first join, as the control plane reads it."""
    parsed = agent_main.parser().parse_args(args)
    facts = uplink.JoinFacts(site=parsed.site, bootstrap_token=parsed.token, endpoint_url=parsed.advertise_url,
                             agent_version="test", heartbeat_interval=parsed.heartbeat_interval, country=parsed.country,
                             region=parsed.region, lat=parsed.lat, lon=parsed.lon, labels=dict(parsed.label))
    request = facts.to_proto(agent_model.Capacity(4, 8 << 30, (), ("CPUExecutionProvider",)), "")
    return agent_model.JoinApplication(
        site=request.site, bootstrap_token=request.bootstrap_token, credential=None, agent_id=request.agent_id,
        endpoint_url=request.endpoint_url, location=agent_model.Location.from_proto(request.location),
        labels=dict(request.labels), agent_version=request.agent_version,
        heartbeat_interval=request.heartbeat_interval_ms / 1000 or None,
        capacity=agent_model.Capacity.from_proto(request.capacity))


async def test_each_node_of_the_agent_daemonset_joins_as_its_own_site(tmp_path: pathlib.Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The control plane gives a site to one agent at a time: the DaemonSet's pods on two
    nodes are two sites, both enrolled by the group's one bootstrap token, each registered on
    join as an edge Site with the group's residency and label."""
    (ds,) = [d for d in by_kind(AGENT[0]) if d["metadata"]["name"] == AGENT[1]]
    (c,) = containers(ds)
    cp = await server.ControlPlane(server_config.ServerConfig(data_dir=tmp_path, port=0, agent_port=0, agent_join_port=0,
                                                              insecure_agents=True)).start()
    try:
        token, _ = cp.store.create_token("bootstrap", "agent", 3600, "admin")  # token create --role agent --ttl 1h
        monkeypatch.setenv("EDGEPLANE_TOKEN", token)  # the Secret, as the pods' env gives it
        grants = {}
        for node, ip in (("edge-node-1", "10.0.0.1"), ("edge-node-2", "10.0.0.2")):
            application = join_application(expand(c, node, ip))
            grants[application.site] = await cp.hub.join_async(application)
        assert sorted(grants) == ["edge-lyon-edge-node-1", "edge-lyon-edge-node-2"]
        assert len({g.agent_id for g in grants.values()}) == 2
        assert {s.site for s in cp.hub.snapshot()} == set(grants)
        await harness.wait_until(lambda: all(cp.store.get("Site", name) for name in grants), 30, what="the sites registered on join")
        for site in [cp.store.get("Site", name) for name in grants]:
            assert site is not None
            assert site.spec["tier"] == "edge" and site.spec["location"]["country"] == "FR", site
            assert site.spec["location"]["region"] == "eu-west"
            assert site.labels == {"edgeplane.io/site-group": "edge-lyon"}
    finally:
        await cp.stop()


def test_each_node_keeps_its_site_identity_in_its_own_folder() -> None:
    """A pod restarted or updated on a node joins again with the identity in that node's
    folder: the old pod ends before the new one starts, the folder is created if missing,
    and each group has its own, so a node moved to another group starts a new identity."""
    (ds,) = [d for d in by_kind(AGENT[0]) if d["metadata"]["name"] == AGENT[1]]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    pod = ds["spec"]["template"]["spec"]
    args = agent_main.parser().parse_args(edgeplane_args(*AGENT))
    assert pod["nodeSelector"] == dict(args.label)  # the nodes of the group, and the sites' label
    (c,) = containers(ds)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (data,) = [volumes[m["name"]] for m in c["volumeMounts"] if m["mountPath"] == str(args.data_dir)]
    assert data["hostPath"]["type"] == "DirectoryOrCreate"
    assert data["hostPath"]["path"].endswith("/" + pod["nodeSelector"]["edgeplane.io/site-group"])


def per_site_steps(site: str) -> list[str]:
    """The commands docs/deploy.md gives "for each site", for that site."""
    guide = (DEPLOY.parents[1] / "docs" / "deploy.md").read_text()
    start = guide.index("```sh", guide.index("for\neach site group:"))
    block = guide[start + len("```sh"):guide.index("```", start + len("```sh"))]
    return [line for line in block.replace("edge-lyon", site).replace("$SITE", site).splitlines()
            if line and not line.startswith("#")]


def site_copy(site: str) -> list[dict[str, Any]]:
    """agent-daemonset.yaml copied for a site group as its header says: the values marked "per site" changed."""
    text = (DEPLOY / "agent-daemonset.yaml").read_text()
    return [d for d in yaml.safe_load_all("\n".join(line.replace("edge-lyon", site) if "per site" in line else line
                                                    for line in text.splitlines())) if d]


def test_the_per_site_steps_give_each_site_its_own_bootstrap_secret() -> None:
    """The per-site steps run again for a second site: nothing they create exists already,
    and each site's agent reads the Secret made for it (a token lasts an hour), and the
    ConfigMap the steps before made once."""
    guide = (DEPLOY.parents[1] / "docs" / "deploy.md").read_text()
    namespace: set[str] = set()
    for site in ("edge-lyon", "edge-paris"):
        docs = site_copy(site)
        assert {d["metadata"]["name"] for d in docs} == {f"edgeplane-agent-{site}"}
        (agent,) = [d for d in docs if d["kind"] == "DaemonSet"]
        ns = agent["metadata"]["namespace"]
        created = [" ".join(made.groups()) for line in per_site_steps(site)
                   if (made := re.match(rf"kubectl -n {ns} create (configmap|secret generic) (\S+)", line))]
        assert created and not namespace & set(created), f"{site}: kubectl create refuses {sorted(namespace & set(created))}"
        namespace |= set(created)
        (c,) = containers(agent)
        assert agent_main.parser().parse_args(expand(c, "node-1")).site == f"{site}-node-1"
        read = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert read and {f"secret generic {name}" for name in read} <= set(created), f"{site} reads {read}, made: {created}"
        for volume in agent["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in volume:
                assert f"kubectl -n {ns} create configmap {volume['configMap']['name']} " in guide


def test_a_stopping_gateway_leaves_the_service_before_it_stops_accepting() -> None:
    """A gateway stops accepting at SIGTERM, while the Service's endpoints and load balancers
    still send it requests for a moment: it waits first (preStop), and the grace period
    covers that wait and the requests in flight it then finishes."""
    (gateway,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "edgeplane-gateway"]
    (c,) = containers(gateway)
    program, seconds = c["lifecycle"]["preStop"]["exec"]["command"]
    assert program == "sleep" and int(seconds) >= 5
    in_flight = runloop.http_server(None).config.timeout_graceful_shutdown
    assert in_flight is not None
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(seconds) + in_flight


def test_the_control_planes_role_grants_each_call_the_kuberay_actuator_makes() -> None:
    """Its RayServices, and the Events KubeRay writes on them (why Serve refused a Serve config)."""
    (role,) = [doc for _, _, doc in DOCS if doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == "edgeplane-rayservices"]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {("ray.io", "rayservices", verb) for verb in ("get", "create", "patch", "delete")} | {("", "events", "list")}
    assert needed <= granted, needed - granted
