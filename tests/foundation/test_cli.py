"""The ``edgeplane`` command line as a subprocess against ``edgeplane serve`` as a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import json
import importlib.metadata
import pathlib
import queue
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import yaml

from orchestrator import catalog
from orchestrator.cli import objects
from orchestrator.security import ca
from orchestrator.store import open_store
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness, loopback

from . import support
from .support import cli, doc


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, offline_fleet: pathlib.Path) -> Iterator[support.ServeProcess]:
    proc = support.ServeProcess(tmp_path_factory.mktemp("cli") / "data", artifact_root=offline_fleet).wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def applied(serve: support.ServeProcess, offline_fleet: pathlib.Path) -> subprocess.CompletedProcess[str]:
    proc = cli("apply", "-f", str(offline_fleet), server_url=serve.url)
    assert proc.returncode == 0, proc.stderr
    return proc


def ok(*args: str, server: support.ServeProcess, **kwargs) -> str:  # type: ignore[no-untyped-def]
    proc = cli(*args, server_url=server.url, **kwargs)
    assert proc.returncode == 0, f"edgeplane {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_apply_a_directory(applied, offline_fleet: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    expected = support.example_names()
    lines = applied.stdout.splitlines()
    want = {f"{kind.lower()}/{name} created" for kind, names in expected.items() for name in names}
    assert set(lines) == want, applied.stdout


def test_get_sites_shows_the_fleet(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    out = ok("get", "sites", server=serve)
    header, *rows = [line for line in out.splitlines() if line.strip()]
    assert header.split()[:4] == ["NAME", "TIER", "COUNTRY", "REGION"]
    # a long GPUS cell wraps onto continuation lines, which start with blanks in the NAME column
    by_name = {r.split()[0]: r.split() for r in rows if not r.startswith(" ")}
    assert set(by_name) == support.example_names()["Site"]
    assert by_name["dc-paris"][1:3] == ["datacenter", "FR"] and by_name["edge-zurich"][1:3] == ["edge", "CH"]


def test_get_output_formats(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    items = json.loads(ok("get", "sites", "-o", "json", server=serve))["items"]
    assert {o["metadata"]["name"] for o in items} == support.example_names()["Site"]
    one = json.loads(ok("get", "site", "edge-lyon", "-o", "json", server=serve))
    assert one["spec"]["location"]["country"] == "FR" and one["metadata"]["generation"] == 1
    as_yaml = yaml.safe_load(ok("get", "models", "-o", "yaml", server=serve))
    assert {o["metadata"]["name"] for o in as_yaml["items"]} == support.example_names()["Model"]
    table = ok("get", "modeldeployments", server=serve)
    assert "intent-eu" in table and "EU" in table
    placements = json.loads(ok("get", "placements", "-o", "json", server=serve))
    assert isinstance(placements["items"], list)
    for p in placements["items"]:
        assert p["site"] in support.example_names()["Site"]
    out = ok("get", "placements", server=serve)
    assert ("No replicas placed." in out) == (placements["items"] == [])
    # NAME narrows placements to one deployment's replicas and events to one object's
    for name in {p["deployment"] for p in placements["items"]}:
        one = json.loads(ok("get", "placements", name, "-o", "json", server=serve))["items"]
        assert one == [p for p in placements["items"] if p["deployment"] == name]
    assert "No replicas of 'no-such' placed." in ok("get", "placements", "no-such", server=serve)
    events = json.loads(ok("get", "events", "intent-eu", "-o", "json", server=serve))["items"]
    assert events and {e["name"] for e in events} == {"intent-eu"}


def test_get_reads_the_views_that_do_not_page_whole(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    """Tokens and the control plane are one answer each; they refuse ``limit``, which a list
    of objects is asked a page at a time with."""
    tokens = json.loads(ok("get", "tokens", "-o", "json", server=serve))
    assert isinstance(tokens["items"], list)
    leadership = json.loads(ok("get", "controlplane", "-o", "json", server=serve))
    assert leadership and "items" not in leadership
    # no table of their own: shown as YAML
    assert yaml.safe_load(ok("get", "tokens", server=serve))["kind"] == tokens["kind"]
    assert yaml.safe_load(ok("get", "controlplane", server=serve)).keys() == leadership.keys()
    assert {k for k in catalog.KIND_ALIASES} == objects.PAGED_KINDS  # every kind whose list pages is asked so


def test_what_get_prints_applies_again(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """kubectl's edit loop: get -o yaml|json, change the spec, apply. Status and the
    server-set metadata are ignored; the resourceVersion read makes the apply conditional."""
    for kind, fmt in (("modeldeployments", "yaml"), ("sites", "json")):
        listed = tmp_path / f"{kind}.{fmt}"
        listed.write_text(ok("get", kind, "-o", fmt, server=serve))
        out = ok("apply", "-f", str(listed), server=serve).splitlines()
        assert out and all(line.endswith(" unchanged") for line in out), out
    site = tmp_path / "site.yaml"
    site.write_text(doc("Site", "edge-roundtrip", support.edge_site_spec()).replace(
        "  name: edge-roundtrip\n", "  name: edge-roundtrip\n  annotations: {owner: team-x}\n"))
    ok("apply", "-f", str(site), server=serve)
    try:
        read = tmp_path / "read.yaml"
        read.write_text(ok("get", "site", "edge-roundtrip", "-o", "yaml", server=serve))
        assert "status:" in read.read_text() and "creationTimestamp:" in read.read_text()
        assert yaml.safe_load(read.read_text())["metadata"]["annotations"] == {"owner": "team-x"}
        edited = tmp_path / "edited.yaml"
        edited.write_text(read.read_text().replace("cpu: 8", "cpu: 12"))
        assert ok("apply", "-f", str(edited), server=serve).strip() == "site/edge-roundtrip configured"
        stale = cli("apply", "-f", str(read), server_url=serve.url)  # the copy read before that change
        assert stale.returncode == 1 and "was changed by someone else" in stale.stderr, stale
        assert json.loads(ok("get", "site", "edge-roundtrip", "-o", "json", server=serve))["spec"]["capacity"]["cpu"] == 12
    finally:
        ok("delete", "site", "edge-roundtrip", server=serve)


def test_describe_and_events(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    out = ok("describe", "modeldeployment", "intent-eu", server=serve)
    body, _, events = out.partition("Events:")
    data = yaml.safe_load(body)
    assert data["metadata"]["name"] == "intent-eu" and data["spec"]["model"] == "intent-classifier"
    assert "created" in events and "anonymous" in events
    log = json.loads(ok("events", "-o", "json", "--limit", "500", server=serve))["items"]
    assert ("created", "ModelDeployment", "intent-eu") in {(e["action"], e["kind"], e["name"]) for e in log}
    ids = [e["id"] for e in log]
    assert len(ids) > 2 and ids == sorted(ids)
    newest = json.loads(ok("events", "-o", "json", "--limit", "2", server=serve))["items"]  # the newest two, not the first two
    assert [e["id"] for e in newest] == ids[-2:] or newest[0]["id"] > ids[-2]  # (or newer still: the reconciler logs on)
    after = json.loads(ok("events", "-o", "json", "--since", str(ids[0]), "--limit", "1", server=serve))["items"]
    assert [e["id"] for e in after] == [ids[1]]
    created = json.loads(ok("events", "-o", "json", "--kind", "modeldeployments", "--name", "intent-eu", server=serve))["items"]
    assert created and {(e["kind"], e["name"]) for e in created} == {("ModelDeployment", "intent-eu")}
    assert "intent-eu" in ok("get", "events", server=serve)
    status = json.loads(ok("status", "-o", "json", server=serve))
    assert status["sites"] == len(support.example_names()["Site"]) and set(status["deployments"]) == support.example_names()["ModelDeployment"]
    # no agent has joined: the edge-only deployments cannot be placed, and status says why, in both forms
    troubled = {n: p for n, p in status["deployments"].items() if p in ("Unschedulable", "Degraded", "Failing", "Invalid")}
    assert troubled and set(status["problems"]) == set(troubled) and all(status["problems"].values()), status
    text = ok("status", server=serve).splitlines()
    for name, phase in troubled.items():
        assert f"  {name}: {phase}: {status['problems'][name]}" in text, text


def test_apply_from_stdin_and_delete_by_file(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    text = doc("Model", "cli-model", support.model_spec()) + "---\n" + doc("ModelDeployment", "cli-dep", support.deployment_spec("cli-model"))
    out = ok("apply", "-f", "-", server=serve, stdin=text)
    assert out.splitlines() == ["model/cli-model created", "modeldeployment/cli-dep created"]
    # deleting the model first is refused by the server ...
    refused = cli("delete", "model", "cli-model", server_url=serve.url)
    assert refused.returncode == 1 and refused.stderr.startswith("error: Model 'cli-model' is used by ModelDeployment cli-dep")
    # ... delete -f orders dependants first
    path = tmp_path / "both.yaml"
    path.write_text(text)
    out = ok("delete", "-f", str(path), server=serve)
    assert out.splitlines() == ["modeldeployment/cli-dep deleted", "model/cli-model deleted"]
    gone = cli("get", "model", "cli-model", server_url=serve.url)
    assert gone.returncode == 1 and "does not exist" in gone.stderr


def test_delete_site_abandoning_its_applications(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "site.yaml"
    path.write_text(doc("Site", "edge-abandoned", support.edge_site_spec()))
    ok("apply", "-f", str(path), server=serve)
    assert ok("delete", "site", "edge-abandoned", "--abandon-applications", server=serve).splitlines() == ["site/edge-abandoned deleted"]
    gone = cli("delete", "site", "edge-abandoned", "--abandon-applications", server_url=serve.url)
    assert gone.returncode == 1 and "no removal of its applications is pending" in gone.stderr, gone
    wrong = cli("delete", "model", "cli-model", "--abandon-applications", server_url=serve.url)
    assert wrong.returncode == 1 and "for a Site only" in wrong.stderr, wrong
    ok("apply", "-f", str(path), server=serve)
    kept = cli("delete", "site", "edge-abandoned", "--abandon-applications", "--keep-site", server_url=serve.url)
    assert kept.returncode == 1 and "left elsewhere is pending" in kept.stderr, kept  # an edge Site leaves none
    assert ok("get", "site", "edge-abandoned", server=serve)
    alone = cli("delete", "site", "edge-abandoned", "--keep-site", server_url=serve.url)
    assert alone.returncode == 2 and "goes with --abandon-applications" in alone.stderr, alone


def test_delete_by_file_is_one_bundle(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    text = "---\n".join([doc("Site", "edge-gone-1", support.edge_site_spec()), doc("Site", "edge-gone-2", support.edge_site_spec()),
                         doc("Model", "gone-model", support.model_spec()), doc("ModelDeployment", "gone-dep", support.deployment_spec("gone-model"))])
    path = tmp_path / "bundle.yaml"
    path.write_text(text)
    ok("apply", "-f", str(path), server=serve)
    assert ok("delete", "site", "edge-gone-2", server=serve).splitlines() == ["site/edge-gone-2 deleted"]
    # one object of the bundle is already gone: nothing is deleted, and the error says so
    refused = cli("delete", "-f", str(path), server_url=serve.url)
    assert refused.returncode == 1 and refused.stderr.strip() == "error: Site 'edge-gone-2' does not exist; nothing was deleted"
    for kind, name in (("site", "edge-gone-1"), ("model", "gone-model"), ("modeldeployment", "gone-dep")):
        assert cli("get", kind, name, server_url=serve.url).returncode == 0
    # a model still used by a deployment outside the bundle refuses the whole bundle
    partial = tmp_path / "partial.yaml"
    partial.write_text(doc("Site", "edge-gone-1", support.edge_site_spec()) + "---\n" + doc("Model", "gone-model", support.model_spec()))
    in_use = cli("delete", "-f", str(partial), server_url=serve.url)
    assert in_use.returncode == 1 and "used by ModelDeployment gone-dep" in in_use.stderr and "nothing was deleted" in in_use.stderr
    assert cli("get", "site", "edge-gone-1", server_url=serve.url).returncode == 0
    # skipping what is gone deletes the rest, dependants first
    out = ok("delete", "-f", str(path), "--ignore-not-found", server=serve)
    assert out.splitlines() == ["modeldeployment/gone-dep deleted", "model/gone-model deleted", "site/edge-gone-1 deleted"]
    assert ok("delete", "-f", str(path), "--ignore-not-found", server=serve).splitlines() == ["Nothing to delete."]


def test_apply_a_file_saved_with_a_bom_and_crlf(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "windows.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + doc("Site", "edge-bom", support.edge_site_spec()).replace("\n", "\r\n").encode())
    assert ok("apply", "-f", str(path), server=serve).splitlines() == ["site/edge-bom created"]
    assert ok("delete", "site", "edge-bom", server=serve).splitlines() == ["site/edge-bom deleted"]


def test_dry_run_changes_nothing(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    before = json.loads(ok("get", "sites", "-o", "json", server=serve))
    path = tmp_path / "s.yaml"
    path.write_text(doc("Site", "edge-lyon", {**support.edge_site_spec(), "capacity": {"cpu": 4, "memoryGiB": 8}}))
    out = ok("apply", "-f", str(path), "--dry-run", server=serve)
    assert out.splitlines()[0] == "site/edge-lyon configured (dry run)"
    assert json.loads(ok("get", "sites", "-o", "json", server=serve)) == before


def test_exit_codes(serve: support.ServeProcess, tmp_path: pathlib.Path) -> None:
    # 1: refused by the control plane, with a one-line reason
    proc = cli("get", "widgets", server_url=serve.url)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: unknown kind 'widgets'; use one of: sites, models, modeldeployments, placements, events, cascades"]
    # 2: wrong usage
    assert cli("get", server_url=serve.url).returncode == 2
    assert cli("frobnicate", server_url=serve.url).returncode == 2
    assert cli("get", "sites", "-o", "xml", server_url=serve.url).returncode == 2
    proc = cli("delete", server_url=serve.url)
    assert proc.returncode == 2 and proc.stderr.startswith("error: give -f FILE or KIND NAME")
    proc = cli("apply", "-f", str(tmp_path / "missing.yaml"), server_url=serve.url)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    assert cli("apply", "-f", str(tmp_path / "empty"), server_url=serve.url).returncode == 2
    proc = cli("token", "create", "--ttl", "soon", server_url=serve.url)
    assert proc.returncode == 2 and "--ttl 'soon'" in proc.stderr
    for ttl in ("0", "0h", "nan", "inf"):
        proc = cli("token", "create", f"--ttl={ttl}", server_url=serve.url)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: --ttl '{ttl}': a lifetime must be more than 0", proc
    # 3: nothing listening
    dead = f"http://127.0.0.1:{support.closed_port()}"
    proc = cli("get", "sites", server_url=dead)
    assert proc.returncode == 3, proc
    assert proc.stderr.startswith(f"error: cannot reach the control plane at {dead}")
    assert cli("--server", dead, "status").returncode == 3  # the flag works as well as the variable
    proc = cli("get", "sites", server_url=serve.url, env={"EDGEPLANE_TOKEN_FILE": str(tmp_path / "no-token")})
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: EDGEPLANE_TOKEN_FILE {tmp_path / 'no-token'}: No such file or directory"
    proc = cli("chat", "assistant", "Hello", server_url=dead)  # the client's way: replicas, then the gateway
    assert proc.returncode == 3 and f"is 'edgeplane serve' running at {dead}?" in proc.stderr, proc
    # 0
    assert cli("--server", serve.url, "get", "sites").returncode == 0


def test_bootstrap_token_lets_an_agent_join_and_plan_shows_per_site_changes(
    serve: support.ServeProcess, applied, tmp_path: pathlib.Path  # type: ignore[no-untyped-def]
) -> None:
    token = ok("token", "create", "--description", "lyon", server=serve).strip()
    assert token.startswith("epb_")
    agent = harness.spawn_agent(
        harness.agent_command(f"127.0.0.1:{serve.agent_port}", "edge-lyon", tmp_path / "agent", token=token, heartbeat_interval=0.3,
                              tls=(serve.ca_file, f"127.0.0.1:{serve.join_port}")),
        "edge-lyon", tmp_path / "agent")
    try:
        deadline = time.monotonic() + 30
        while True:
            site = json.loads(ok("get", "site", "edge-lyon", "-o", "json", server=serve))
            if site.get("status", {}).get("health") == "Healthy":
                break
            assert time.monotonic() < deadline, f"edge-lyon never became healthy: {site.get('status')}\n{agent.log()}"
            time.sleep(0.2)
        while "joined control plane" not in agent.log():  # enrolled over the join port, then the session over mutual TLS
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        log = json.loads(ok("events", "-o", "json", "--limit", "500", server=serve))["items"]
        joins = [e for e in log if e["action"] == "agent-joined" and e["name"] == "edge-lyon"]
        # the token was used once; on a loaded machine a late heartbeat may make the agent
        # join again afterwards, with the credential it was given
        with_token = [e for e in joins if e["reason"] == "agent joined with a bootstrap token"]
        assert len(with_token) == 1 and joins[0] == with_token[0], joins
        # a model of its own: edge-lyon serves each of the examples' models for a deployment already
        path = tmp_path / "lyon.yaml"
        model = support.model_spec()
        model["variants"][0]["resources"] = {"cpu": 0.25, "memoryMiB": 256}  # what the busy site has left
        path.write_text(doc("Model", "lyon-model", model) + "---\n" + doc("ModelDeployment", "lyon-only", {
            "model": "lyon-model", "variant": "small", "replicas": {"min": 1, "max": 1},
            "placement": {"residency": ["FR"], "tiers": ["edge"], "siteSelector": {"zone": "eu-west"}}}))
        out = ok("plan", "-f", str(path), server=serve)
        assert out.splitlines()[:2] == ["model/lyon-model would be created", "modeldeployment/lyon-only would be created"], out
        assert "Replica changes per site" in out, out
        rows = [line.split() for line in out.splitlines() if "lyon-only" in line and "edge-lyon" in line]
        assert rows and rows[0][:3] == ["edge-lyon", "lyon-only", "small"] and rows[0][-1] == "added", out
        plan = json.loads(ok("plan", "-f", str(path), "-o", "json", server=serve))
        assert {"site": "edge-lyon", "deployment": "lyon-only", "variant": "small", "before": 0, "after": 1,
                "change": "added"} in plan["changes"]
        assert cli("get", "modeldeployment", "lyon-only", server_url=serve.url).returncode == 1  # plan applied nothing
    finally:
        agent.stop()


def test_an_agent_given_only_the_cas_sha256_joins_and_a_wrong_one_never_does(
    serve: support.ServeProcess, applied, tmp_path: pathlib.Path  # type: ignore[no-untyped-def]
) -> None:
    made = cli("token", "create", server_url=serve.url)
    assert made.returncode == 0 and made.stdout.startswith("epb_")
    pin = re.search(r"--ca-sha256 ([0-9a-f]{64})", made.stderr)
    assert pin, made.stderr
    assert pin.group(1) == hashlib.sha256(ssl.PEM_cert_to_DER_cert(serve.ca_file.read_text())).hexdigest()
    wrong = pin.group(1)[::-1]

    def pinned(site: str, digest: str) -> harness.AgentProcess:
        cmd = harness.agent_command(f"127.0.0.1:{serve.agent_port}", site, tmp_path / site, token=made.stdout.strip(),
                                    heartbeat_interval=0.3, tls=(serve.ca_file, f"127.0.0.1:{serve.join_port}"))
        at = cmd.index("--ca-file")
        cmd[at:at + 2] = ["--ca-sha256", f"sha256:{digest.upper()}"]  # as a person may paste it
        return harness.spawn_agent(cmd, site, tmp_path / site)

    impostor = pinned("edge-berlin", wrong)
    agent = pinned("edge-madrid", pin.group(1))
    try:
        deadline = time.monotonic() + 30
        while "joined control plane" not in agent.log():  # enrolled with the CA it fetched, then mutual TLS
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        assert (tmp_path / "edge-madrid" / "ca.crt").read_text() == serve.ca_file.read_text()
        while "presented no certificate with SHA-256" not in impostor.log():
            assert time.monotonic() < deadline, impostor.log()
            time.sleep(0.1)
        assert not (tmp_path / "edge-berlin" / "ca.crt").exists() and "joined control plane" not in impostor.log()
    finally:
        agent.stop()
        impostor.stop()


def test_an_agent_given_a_new_cas_sha256_replaces_the_ca_it_saved_from_an_earlier_one(
    serve: support.ServeProcess, applied, tmp_path: pathlib.Path  # type: ignore[no-untyped-def]
) -> None:
    """An agent enrolled again at a control plane with a new CA (its key and certificate
    removed, a new token and the new CA's --ca-sha256 given) kept verifying against the CA it
    had saved from the old one, and never joined: the pin is the operator's word, newer."""
    made = cli("token", "create", server_url=serve.url)
    assert made.returncode == 0, made.stderr
    pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(serve.ca_file.read_text())).hexdigest()
    data_dir = tmp_path / "edge-porto"
    data_dir.mkdir()
    old = ca.CertificateAuthority.load_or_create(tmp_path / "old-ca")
    (data_dir / "ca.crt").write_bytes(old.certificate_pem)  # saved when it enrolled at the old control plane
    cmd = harness.agent_command(f"127.0.0.1:{serve.agent_port}", "edge-porto", data_dir, token=made.stdout.strip(),
                                heartbeat_interval=0.3, tls=(serve.ca_file, f"127.0.0.1:{serve.join_port}"))
    at = cmd.index("--ca-file")
    cmd[at:at + 2] = ["--ca-sha256", pin]
    agent = harness.spawn_agent(cmd, "edge-porto", data_dir)
    try:
        deadline = time.monotonic() + 30
        while "joined control plane" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        assert (data_dir / "ca.crt").read_text() == serve.ca_file.read_text()
        assert "is not the one --ca-sha256 names: replacing it" in agent.log()
    finally:
        agent.stop()


def test_api_tokens_with_auth_on(tmp_path: pathlib.Path, offline_fleet: pathlib.Path) -> None:
    secured = support.ServeProcess(tmp_path / "data", "--auth", "token", artifact_root=offline_fleet).wait_ready()
    try:
        admin_file = str(tmp_path / "data" / "admin.token")
        denied = cli("get", "sites", server_url=secured.url)
        assert denied.returncode == 1 and denied.stderr.startswith("error: this API needs 'Authorization: Bearer <token>'")
        proc = cli("token", "create", "--role", "read", "--description", "ci", server_url=secured.url,
                   env={"EDGEPLANE_TOKEN_FILE": admin_file})
        assert proc.returncode == 0, proc.stderr
        read_token = proc.stdout.strip()
        assert read_token.startswith("epa_")
        as_reader = {"EDGEPLANE_TOKEN": read_token}
        assert cli("get", "sites", server_url=secured.url, env=as_reader).returncode == 0
        site = tmp_path / "site.yaml"
        site.write_text(doc("Site", "edge-x", support.edge_site_spec()))
        refused = cli("apply", "-f", str(site), server_url=secured.url, env=as_reader)
        assert refused.returncode == 1 and "has role 'read'; this needs 'admin'" in refused.stderr.splitlines()[0]
        assert cli("--token", "wrong", "get", "sites", server_url=secured.url).returncode == 1
        applied = cli("apply", "-f", str(site), server_url=secured.url, env={"EDGEPLANE_TOKEN_FILE": admin_file})
        assert applied.returncode == 0 and applied.stdout.strip() == "site/edge-x created"
        listed = cli("get", "sites", "-o", "json", server_url=secured.url, env=as_reader)
        assert [o["metadata"]["name"] for o in json.loads(listed.stdout)["items"]] == ["edge-x"]
        created = json.loads(cli("token", "create", "--role", "admin", "--ttl", "2h", "-o", "json", server_url=secured.url,
                                 env={"EDGEPLANE_TOKEN_FILE": admin_file}).stdout)
        assert created["role"] == "admin" and created["purpose"] == "api" and created["expiresAt"] is not None
        # list, then revoke the reader's token: it stops working at once, and the log says who and why
        as_admin = {"EDGEPLANE_TOKEN_FILE": admin_file}
        assert cli("token", "list", server_url=secured.url, env=as_reader).returncode == 1  # admin only
        tokens = json.loads(cli("token", "list", "-o", "json", server_url=secured.url, env=as_admin).stdout)["items"]
        reader = next(t for t in tokens if t["description"] == "ci")
        assert (reader["role"], reader["state"]) == ("read", "active") and read_token not in json.dumps(tokens)
        table = cli("token", "list", server_url=secured.url, env=as_admin).stdout
        assert re.search(rf"^{reader['id']}\s+api\s+read\s+active\s+\S+\s+never\s+ci\s*$", table, re.M), table
        revoked = cli("revoke", "token", reader["id"], "--reason", "leaked in a log", server_url=secured.url, env=as_admin)
        assert revoked.returncode == 0 and revoked.stdout.strip() == f"token {reader['id']} revoked", revoked
        assert cli("get", "sites", server_url=secured.url, env=as_reader).returncode == 1
        events = json.loads(cli("events", "--kind", "Token", "-o", "json", server_url=secured.url, env=as_admin).stdout)["items"]
        assert ("token-revoked", reader["id"], "leaked in a log") in [(e["action"], e["name"], e["reason"]) for e in events]
        tokens = json.loads(cli("token", "list", "-o", "json", server_url=secured.url, env=as_admin).stdout)["items"]
        assert reader["id"] not in [t["id"] for t in tokens] and tokens  # only the ones that still work...
        tokens = json.loads(cli("token", "list", "--all", "-o", "json", server_url=secured.url, env=as_admin).stdout)["items"]
        assert next(t for t in tokens if t["id"] == reader["id"])["state"] == "revoked"  # ...unless asked
        unknown = cli("revoke", "agent", "edge-nowhere", server_url=secured.url, env=as_admin)
        assert unknown.returncode == 1 and unknown.stderr.strip() == "error: no agent has joined as site 'edge-nowhere'"
    finally:
        secured.stop()


def test_a_reader_that_stops_early_gets_no_traceback(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    """`edgeplane get sites -o yaml | head`: the pipe closes before the command writes."""
    env = support.clean_env(EDGEPLANE_SERVER=serve.url)
    proc = subprocess.Popen([str(support.EDGEPLANE), "get", "sites", "-o", "yaml"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `head` that has read its lines and gone
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert err == "", err


def test_repeated_f_is_one_atomic_bundle(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    a, b, folder = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "more"
    folder.mkdir()
    a.write_text(doc("Model", "multi-model", support.model_spec()))
    b.write_text(doc("ModelDeployment", "multi-dep", support.deployment_spec("multi-model")))
    (folder / "c.yaml").write_text(doc("Site", "edge-multi", support.edge_site_spec()))
    everything = ["-f", str(a), "-f", str(b), "-f", str(folder), "-f", "-"]
    stdin = doc("Site", "edge-stdin", support.edge_site_spec())
    plan = ok("plan", *everything, server=serve, stdin=stdin).splitlines()
    assert plan[:4] == ["model/multi-model would be created", "modeldeployment/multi-dep would be created",
                        "site/edge-multi would be created", "site/edge-stdin would be created"], plan
    dry = ok("apply", *everything, "--dry-run", server=serve, stdin=stdin).splitlines()
    assert dry[:4] == ["model/multi-model created (dry run)", "modeldeployment/multi-dep created (dry run)",
                       "site/edge-multi created (dry run)", "site/edge-stdin created (dry run)"], dry
    assert cli("get", "model", "multi-model", server_url=serve.url).returncode == 1
    # a bad file anywhere in the bundle applies nothing, and is named
    bad = tmp_path / "bad.yaml"
    bad.write_text(doc("Site", "edge-bad", {**support.edge_site_spec(), "colour": "blue"}))
    refused = cli("apply", "-f", str(a), "-f", str(bad), server_url=serve.url)
    assert refused.returncode == 1 and str(bad) in refused.stderr, refused.stderr
    assert cli("get", "model", "multi-model", server_url=serve.url).returncode == 1
    out = ok("apply", *everything, server=serve, stdin=stdin).splitlines()
    assert out == ["model/multi-model created", "modeldeployment/multi-dep created", "site/edge-multi created", "site/edge-stdin created"]
    out = ok("delete", *everything, server=serve, stdin=stdin).splitlines()
    assert out == ["modeldeployment/multi-dep deleted", "model/multi-model deleted", "site/edge-multi deleted", "site/edge-stdin deleted"]
    assert cli("apply", "-f", "-", "-f", "-", server_url=serve.url, stdin="").returncode == 2


RFC3339 = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"


def test_times_are_rfc3339_and_numbers_readable(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    import re

    site = yaml.safe_load(ok("get", "site", "edge-lyon", "-o", "yaml", server=serve))
    assert re.match(RFC3339, site["metadata"]["creationTimestamp"]), site["metadata"]
    listed = json.loads(ok("get", "modeldeployments", "-o", "json", server=serve))["items"]
    assert all(re.match(RFC3339, o["metadata"]["creationTimestamp"]) for o in listed)
    events = json.loads(ok("events", "-o", "json", server=serve))["items"]
    assert events and all(re.match(RFC3339, e["ts"]) for e in events)
    token = json.loads(ok("token", "create", "--ttl", "1h", "-o", "json", server=serve))
    assert re.match(RFC3339, token["expiresAt"])
    out = ok("describe", "modeldeployment", "doc-fields-fr", server=serve)
    described = yaml.safe_load(out.partition("Events:")[0])
    assert described["placement"]["latency"], described
    assert re.match(RFC3339, described["metadata"]["creationTimestamp"])
    computed = yaml.safe_dump({"placement": described["placement"], "status": described.get("status")})
    long_decimals = re.findall(r"\d+\.\d{4,}", computed)  # the manifest's own coordinates aside
    assert not long_decimals, long_decimals


def test_a_name_is_one_path_segment_never_another_object(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    """A name goes into the URL escaped: ``..``, ``/``, ``?`` and ``%`` in it name that object
    (which does not exist), never another path or a query."""
    ok("apply", "-f", "-", server=serve, stdin=doc("Site", "cli-victim", support.edge_site_spec()))
    try:
        for argv in (["delete", "model", "../sites/cli-victim"], ["captures", "EU", "--delete", "../../sites/cli-victim"]):
            assert cli(*argv, server_url=serve.url).returncode == 1
            assert "cli-victim" in ok("get", "site", "cli-victim", server=serve), f"edgeplane {' '.join(argv)} deleted Site cli-victim"
        for argv, error in ((["get", "sites", "edge-lyon?x=1"], "Site 'edge-lyon?x=1' does not exist"),
                            (["get", "site", ".."], "Site '..' does not exist"),
                            (["describe", "site", "edge-lyon%2f"], "Site 'edge-lyon%2f' does not exist"),
                            (["describe", "site", "edge-lyon/"],  # the server redirects to edge-lyon: not the object asked for
                             "the control plane answered GET /v1/site/edge-lyon%2F with HTTP 307 and no JSON object"),
                            (["infer", "intent-classifier?x=1", "--data", '{"input": [[0.5]]}'], "model 'intent-classifier?x=1' is not deployed")):
            proc = cli(*argv, server_url=serve.url)
            assert proc.returncode == 1 and proc.stderr.splitlines()[0].startswith(f"error: {error}"), proc
            assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc
    finally:
        ok("delete", "site", "cli-victim", server=serve)


def test_describe_model_shows_each_variants_inputs_and_outputs(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(ok("describe", "model", "intent-classifier", "-o", "json", server=serve))
    variants = {v["name"]: v for v in data["variants"]}
    for name in ("distilled", "full"):
        assert variants[name]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}]
        assert variants[name]["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 8]}]
    llm = json.loads(ok("describe", "model", "assistant", "-o", "json", server=serve))["variants"]
    assert llm == [{"name": name, "runtime": "onnx-genai", "io": "OpenAI chat and text completions (/openai/v1 at the gateway)"}
                   for name in ("small", "large")]
    assert "datatype: FP32" in ok("describe", "model", "doc-fields", server=serve)


def test_client_commands_start_without_the_control_plane_or_the_planner() -> None:
    """Every command but serve, gateway and the simulation's own run builds its parser
    and runs without importing the control plane, the scheduler (scipy) or Ray, and one
    that reads no manifest without the manifest schema."""
    code = ("import sys; from orchestrator.cli import main; main.build_parser(serve_options=False)"
            ".parse_args(['simulate', '--fail-site', 'x']);"
            " print(sorted(m for m in ('orchestrator.server', 'orchestrator.scheduler', 'orchestrator.manifests.schema', 'scipy', 'ray',"
            " 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=support.REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], [], ["--server", "http://127.0.0.1:9"], ["serve", "--help"], ["gateway", "--help"],
                                  ["serve", "--port", "99999"], ["gateway", "--control-plane", "http://x", "--port", "-1"]])
def test_the_first_help_a_user_asks_for_does_not_load_the_control_plane(argv: list[str]) -> None:
    """Help and usage errors answer before the servers are imported (about 2 s): serve's and
    gateway's options are defined apart from them (orchestrator.server_options)."""
    code = ("import sys; from orchestrator.cli import main\n"
            f"try:\n    main.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('orchestrator.server', 'orchestrator.gatewayd.server', 'ray') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=support.REPO)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
    said = done.stdout + done.stderr
    assert "usage: edgeplane" in said or ": error: argument --port: " in said, said  # help, or the one-line usage error


def test_status_says_when_a_replica_is_not_notified_of_other_replicas_writes() -> None:
    from orchestrator.cli.status import _leadership_line

    view = {"replica": "cp-b", "role": "follower", "election": "lease", "agents": {"connected": 1},
            "leader": {"replica": "cp-a", "fencingToken": 4}, "relay": {"connected": True},
            "storeChanges": {"notified": True, "pollSeconds": 1.0}}
    assert _leadership_line(view) == "replica cp-b: follower; leader cp-a (fencing token 4); 1 agent here, relayed to the leader"
    view["storeChanges"] = {"notified": False, "pollSeconds": 2.0, "lastError": "connection refused"}
    assert _leadership_line(view).endswith("; other replicas' writes read every 2s, not notified (connection refused)")


@pytest.mark.parametrize(("left_s", "said"), [
    (3650 * 86400, None),
    (30 * 86400, None),
    (30 * 86400 - 1, "warning: the agents' CA ends in 29 day(s) (2036-12-05 01:49:52 UTC): from then on no agent can join or renew "
                     "its certificate, and agents must join a new CA (docs/security.md)"),
    (5 * 3600 + 59, "warning: the agents' CA ends in 5 hour(s) (2036-12-05 01:49:52 UTC): from then on no agent can join or renew "
                    "its certificate, and agents must join a new CA (docs/security.md)"),
    (0, "error: the agents' CA expired at 2036-12-05 01:49:52 UTC: no agent can join or renew its certificate; agents must join a new CA"),
    (-86400, "error: the agents' CA expired at 2036-12-05 01:49:52 UTC: no agent can join or renew its certificate; "
             "agents must join a new CA"),
])
def test_status_says_when_the_agents_ca_ends_and_warns_within_30_days(left_s: int, said: str | None) -> None:
    from orchestrator.cli.status import agent_ca_lines

    view = {"sha256": "ab" * 32, "notAfter": "2036-12-05T01:49:52Z", "expiresInSeconds": left_s}
    assert agent_ca_lines(view) == ["agents' CA (SHA-256 abababababababab...): valid until 2036-12-05 01:49:52 UTC",
                                    *([said] if said else [])]


def test_events_follow_prints_each_new_event_until_interrupted(serve: support.ServeProcess, applied) -> None:  # type: ignore[no-untyped-def]
    follower = support.follow_events(serve.url, "--kind", "models", "--limit", "1")
    try:
        first = json.loads(follower.stdout.readline())  # type: ignore[union-attr]
        assert first["kind"] == "Model"  # the newest model event, as one JSON object a line
        ok("apply", "-f", "-", server=serve, stdin=doc("Model", "cli-follow", support.model_spec()))
        lines: list[dict] = []
        deadline = time.monotonic() + 30
        while not any(e["name"] == "cli-follow" for e in lines) and time.monotonic() < deadline:
            line = follower.stdout.readline()  # type: ignore[union-attr]
            assert line, follower.stderr.read()  # type: ignore[union-attr]
            lines.append(json.loads(line))
        assert [(e["action"], e["kind"], e["name"]) for e in lines][-1] == ("created", "Model", "cli-follow")
        assert all(e["id"] > first["id"] for e in lines) and {e["kind"] for e in lines} == {"Model"}
    finally:
        err = support.interrupt(follower)
    assert follower.returncode == 130 and "Traceback" not in err, err


@dataclasses.dataclass
class _Following:
    """``events -w --kind models --limit 1`` following a control plane (``first``) that the
    test stops and starts ``again`` on the same ports."""

    first: support.ServeProcess
    follower: subprocess.Popen[str]
    again: support.ServeProcess | None = None
    err: str = ""  # what the follower wrote on stderr, once interrupted

    def start_again(self, data_dir: pathlib.Path) -> support.ServeProcess:
        """A control plane on ``data_dir`` (the first one's, or another store) on the first one's
        ports, once the first one has stopped."""
        self.first.stop()
        self.again = support.ServeProcess(data_dir, ports=(self.first.port, self.first.agent_port, self.first.join_port)).wait_ready()
        return self.again

    def next_name(self) -> str:
        """The name of the next event the follower prints."""
        return json.loads(self.follower.stdout.readline())["name"]  # type: ignore[union-attr]


@contextlib.contextmanager
def _following_a_restart(data_dir: pathlib.Path) -> Iterator[_Following]:
    """A control plane on ``data_dir`` followed by ``events -w``, which must exit 130 on Ctrl-C
    without a traceback once the test is done with it; every control plane started is stopped."""
    first = support.ServeProcess(data_dir).wait_ready()
    following = _Following(first, support.follow_events(first.url, "--kind", "models", "--limit", "1"))
    try:
        yield following
    finally:
        following.err = support.interrupt(following.follower)
        if following.again is not None:
            following.again.stop()
        first.stop()
    assert following.follower.returncode == 130 and "Traceback" not in following.err, following.err


def test_events_follow_waits_out_a_control_plane_restart(tmp_path: pathlib.Path) -> None:
    """``events -w`` exited (code 3) when the control plane went away for a restart. It says
    so once on stderr, asks again, and goes on with what was logged meanwhile, nothing twice."""
    with _following_a_restart(tmp_path / "cp") as following:
        ok("apply", "-f", "-", server=following.first, stdin=doc("Model", "before-restart", support.model_spec()))
        seen = [following.next_name()]
        assert seen == ["before-restart"], seen
        again = following.start_again(tmp_path / "cp")
        ok("apply", "-f", "-", server=again, stdin=doc("Model", "after-restart", support.model_spec()))
        deadline = time.monotonic() + 30
        while seen[-1] != "after-restart" and time.monotonic() < deadline:
            line = following.follower.stdout.readline()  # type: ignore[union-attr]
            assert line, following.follower.stderr.read()  # type: ignore[union-attr]
            seen.append(json.loads(line)["name"])
        assert seen == ["before-restart", "after-restart"], seen
        assert following.follower.poll() is None  # still following
    assert following.err.count("warning: cannot reach") == 1 and "the control plane answers again; following" in following.err, following.err


def test_events_follow_starts_again_from_the_newest_events_of_another_store(tmp_path: pathlib.Path) -> None:
    """A control plane back on another store (a fresh one, a restored backup) numbers its
    events from that store's own start: ``events -w`` went on after an id of the first store
    and printed the other's events past it as if they followed. It says so on stderr and
    follows the other store from its newest events."""
    other = open_store(tmp_path / "other" / "state.db")
    other.record(*[store_mod.Event("admin", "created", "Model", f"other-{i}", "") for i in range(50)])
    other.close()
    with _following_a_restart(tmp_path / "cp") as following:
        ok("apply", "-f", "-", server=following.first, stdin=doc("Model", "first-store", support.model_spec()))
        assert following.next_name() == "first-store"
        again = following.start_again(tmp_path / "other")
        assert following.next_name() == "other-49"
        ok("apply", "-f", "-", server=again, stdin=doc("Model", "after-restart", support.model_spec()))
        assert following.next_name() == "after-restart"
    assert len([line for line in following.err.splitlines() if "now reads another store" in line]) == 1, following.err


def test_events_follow_across_a_restore_from_an_older_backup_prints_what_is_logged_after_it(tmp_path: pathlib.Path) -> None:
    """A store restored from an older backup keeps its id and numbers new events from the
    backup's last: ``events -w``, asking after an id of the lost events, printed nothing logged
    after the restore until the new ids passed the old. It says the store went back, and
    prints what is logged from then on."""
    with _following_a_restart(tmp_path / "cp") as following:
        first = following.first
        ok("apply", "-f", "-", server=first, stdin=doc("Model", "before-backup", support.model_spec()))
        assert following.next_name() == "before-backup"
        backup = tmp_path / "backup.db"
        with sqlite3.connect(tmp_path / "cp" / "state.db") as src, sqlite3.connect(backup) as dst:
            src.backup(dst)
        for i in range(3):
            ok("apply", "-f", "-", server=first, stdin=doc("Model", f"lost-{i}", support.model_spec()))
            assert following.next_name() == f"lost-{i}"
        first.stop()
        for suffix in ("", "-wal", "-shm"):
            pathlib.Path(f"{tmp_path / 'cp' / 'state.db'}{suffix}").unlink(missing_ok=True)
        backup.rename(tmp_path / "cp" / "state.db")
        again = following.start_again(tmp_path / "cp")
        ok("apply", "-f", "-", server=again, stdin=doc("Model", "after-restore", support.model_spec()))
        names: list[str] = []
        while "after-restore" not in names and len(names) < 2:
            names.append(following.next_name())
        # (the backup's last one, logged within the same second as the last printed, may come again first)
        assert names in (["after-restore"], ["before-backup", "after-restore"]), names
    assert len([line for line in following.err.splitlines() if "store went back (restored from a backup?)" in line]) == 1, following.err


class _Outage(http.server.ThreadingHTTPServer):
    """A control plane seen through a reverse proxy across an outage: the event log, then
    what each says while it cannot answer (the store down: 503; the proxy while the control
    plane restarts: 502, 504; busy: 429), then the log again with one event more. With
    ``pruned_through``, its answers name their store and say retention deleted the events
    up to that id (the fleet's own, newer than the audit event it shows first), and the
    event logged during the outage comes after them."""

    EVENT = {"actor": "admin", "action": "created", "kind": "Model", "name": "m", "reason": ""}

    def __init__(self, pruned_through: int = 0) -> None:
        self.answers: list[tuple[int, dict[str, str], bytes]] = [
            (503, {"content-type": "application/json"}, b'{"error": "the store does not answer: connection refused"}'),
            (502, {"content-type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"),
            (504, {"content-type": "text/html"}, b"<html><body>504 Gateway Time-out</body></html>"),
            (429, {"content-type": "application/json", "retry-after": "1"}, b'{"error": "too many requests"}'),
        ]
        self.asked: list[str] = []
        outage = self
        said = {"store": "s1", "prunedThrough": pruned_through} if pruned_through else {}
        later = {**outage.EVENT, "id": max(2, pruned_through + 1), "name": "m2"}

        class Handler(loopback.CannedHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outage.asked.append(self.path)
                if len(outage.asked) == 1:
                    answer = (200, {}, json.dumps({"items": [{**outage.EVENT, "id": 1}], **said}).encode())
                elif outage.answers:
                    answer = outage.answers.pop(0)
                else:
                    items = [later] if "since=1&" in self.path else []
                    answer = (200, {}, json.dumps({"items": items, **said}).encode())
                status, headers, body = answer
                self.reply(status, body, headers)

        super().__init__(("127.0.0.1", 0), Handler)


def follow_across(outage: _Outage, *args: str) -> tuple[list[int], str]:
    """The ids of the first 2 events ``events -w *args`` prints across ``outage``, and its stderr."""
    thread = threading.Thread(target=outage.serve_forever, daemon=True)
    thread.start()
    follower = support.follow_events(f"http://127.0.0.1:{outage.server_port}", *args)
    printed: queue.Queue[str] = queue.Queue()
    # read in a thread so that a follower which prints nothing fails the test instead of hanging it
    reader = threading.Thread(target=lambda: [printed.put(follower.stdout.readline()) for _ in range(2)],  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        try:
            lines = [printed.get(timeout=60) for _ in range(2)]
        except queue.Empty:
            pytest.fail("events --follow printed fewer than 2 events in 60 s")
        assert all(lines), follower.stderr.read()  # type: ignore[union-attr]
        assert follower.poll() is None  # still following
    finally:
        follower.send_signal(signal.SIGINT)
        reader.join(timeout=30)  # its readline ends as the follower exits
        _, err = follower.communicate(timeout=30)
        outage.shutdown()
        outage.server_close()
        thread.join()
    assert follower.returncode == 130 and "Traceback" not in err, err
    return [json.loads(line)["id"] for line in lines], err


def test_events_follow_waits_out_answers_that_say_retry_later() -> None:
    """``events -w`` exited (code 1) at the first 503, which the control plane answers while
    its store does not, and a reverse proxy while the control plane restarts."""
    ids, err = follow_across(_Outage())
    assert ids == [1, 2]
    assert err.splitlines() == ["warning: the store does not answer: connection refused (HTTP 503); asking again every 1s",
                                "the control plane answers again; following"], err


def test_events_follow_back_from_an_outage_is_not_warned_of_events_pruned_before_it_began() -> None:
    """``events -w`` starts from the newest events, so events retention deleted before its
    first answer are none it follows; back from an outage it said they "may be missing"."""
    ids, err = follow_across(_Outage(pruned_through=6), "--kind", "models")
    assert ids == [1, 7]
    assert err.splitlines() == ["warning: the store does not answer: connection refused (HTTP 503); asking again every 1s",
                                "the control plane answers again; following"], err


@pytest.mark.parametrize("command", [["edgeplane"], ["edgeplane-agent"]])
def test_both_commands_say_their_version(command: list[str]) -> None:
    import edge_agent
    import orchestrator

    bin_dir = pathlib.Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / command[0]), "--version"], capture_output=True, text=True, timeout=60)
    version = orchestrator.__version__ if command == ["edgeplane"] else edge_agent.__version__
    assert version == importlib.metadata.version("edgeplane")  # the package's own version, not a copy that drifted
    assert done.returncode == 0 and done.stdout.strip() == f"{command[0]} {version}", done.stderr
