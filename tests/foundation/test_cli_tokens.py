"""Tokens through ``edgeplane``, against ``edgeplane serve`` as a subprocess: a bootstrap
token an agent joins with (pinning the CA by its SHA-256, or replacing one saved from an
earlier CA), and API tokens with auth on: roles, lifetimes, listing and revoking."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import ssl
import time

from orchestrator.security import ca
from orchestrator.testing import harness

from . import support
from .support import cli, doc, ok


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
        assert re.search(rf"^{reader['id']}\s+api\s+read\s+active\s+\S+\s+never\s+any\s+-\s+ci\s*$", table, re.M), table
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
