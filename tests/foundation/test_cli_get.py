"""The reading commands of ``edgeplane`` (get, describe, events, status) as a subprocess
against ``edgeplane serve`` as a subprocess: tables, ``-o json`` / ``-o yaml``, the views
that are one answer each, times and numbers as people read them, and what status says."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator import catalog
from orchestrator.cli import objects

from . import support
from .support import ok


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
    # the two forms are two reads: of a fleet that a pass has seen, and that no later pass changes
    assert set(serve.wait_data_centres_observed().values()) == {"Unreachable"}
    status = json.loads(ok("status", "-o", "json", server=serve))
    assert status["sites"] == len(support.example_names()["Site"]) and set(status["deployments"]) == support.example_names()["ModelDeployment"]
    # no agent has joined: the edge-only deployments cannot be placed, and status says why, in both forms
    troubled = {n: p for n, p in status["deployments"].items() if p in ("Unschedulable", "Degraded", "Failing", "Invalid")}
    assert troubled and set(status["problems"]) == set(troubled) and all(status["problems"].values()), status
    text = ok("status", server=serve).splitlines()
    for name, phase in troubled.items():
        assert f"  {name}: {phase}: {status['problems'][name]}" in text, text

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
