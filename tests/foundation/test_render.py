"""Every status the reconciler writes renders in every output format, and a CLI bug is one
line and exit code 1, never a traceback."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from orchestrator.cli import infer
from orchestrator.cli import main as cli_main
from orchestrator.cli import render
from orchestrator.manifests import schema
from orchestrator.reconciler import autoscaler, planning, rollout
from orchestrator.reconciler import snapshot as snap
from orchestrator.testing import loopback

from . import support


def _autoscaling_shapes() -> dict[str, dict[str, Any]]:
    rec = autoscaler.Recommendation
    return {
        "no load yet": rec(None, "inflight", 8.0, 2).status(),
        "count held, no load now": rec(3, "inflight", 8.0, 2).status(),  # desired count, no observedPerReplica
        "measured": rec(4, "rps", 100.0, 3, reporting=2, per_replica=131.5).status(),
        "scaled to zero": rec(0, "inflight", 8.0, 0, reason="scaled to zero: the next request starts a replica").status(),
        "woken": rec(1, "inflight", 8.0, 0, reason="scaled to zero and asked for: starting a replica").status(),
    }


def _rollout_shapes() -> dict[str, dict[str, Any]]:
    sha = "ab" * 32
    return {
        "rolling": rollout.Rollout(sha, ("edge-lyon",), ("edge-berlin",), ("edge-madrid",)).status(),
        "canary": rollout.Rollout(sha, (), ("edge-lyon",), ("edge-berlin", "edge-madrid"), step=10).status(),
        "halted": rollout.Rollout(sha, (), (), ("edge-berlin",), failed=(("edge-lyon", "corrupt artifact"),)).status(),
    }


def _statuses() -> dict[str, dict[str, Any]]:
    spec = schema.ModelDeploymentSpec.model_validate({"model": "m", "replicas": {"min": 1, "max": 3}})
    invalid = planning.deployment_status(None, snap.DeploymentRecord("d", 1, spec), None, [])  # type: ignore[arg-type]
    base = {"phase": "Progressing", "reason": "waiting", "replicas": 2, "wantedReplicas": 3, "readyReplicas": 1,
            "sites": ["edge-lyon:distillednx1"], "observedGeneration": 1}
    out: dict[str, dict[str, Any]] = {"before the first pass": {}, "model missing": invalid, "plain": base}
    out.update({f"autoscaling: {k}": {**base, "autoscaling": v} for k, v in _autoscaling_shapes().items()})
    out.update({f"rollout: {k}": {**base, "rollout": v} for k, v in _rollout_shapes().items()})
    out["autoscaling and rollout"] = {**base, "autoscaling": _autoscaling_shapes()["count held, no load now"],
                                      "rollout": _rollout_shapes()["halted"]}
    return out


def _deployment(status: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "edgeplane.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "d", "labels": {}, "generation": 1, "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"model": "m", "replicas": {"min": 1, "max": 3}, "placement": {"residency": ["EU"]}}, "status": status}


@pytest.mark.parametrize("output", ["table", "json", "yaml"])
@pytest.mark.parametrize("name", sorted(_statuses()))
def test_every_deployment_status_renders(name: str, output: str, capsys: pytest.CaptureFixture[str]) -> None:
    obj = _deployment(_statuses()[name])
    if output == "table":
        render.objects("ModelDeployment", [obj])
        header, row = capsys.readouterr().out.splitlines()[:2]
        assert header.split()[:2] == ["NAME", "MODEL"] and row.split()[:2] == ["d", "m"]
        phase = obj["status"].get("phase", "Pending")
        assert phase in row
        if "desiredReplicas" in obj["status"].get("autoscaling", {}):
            assert f"autoscaled to {obj['status']['autoscaling']['desiredReplicas']}" in row
    else:
        render.dump({"items": [obj]}, output)
        text = capsys.readouterr().out
        back = json.loads(text) if output == "json" else yaml.safe_load(text)
        assert back["items"][0] == obj


def test_a_piped_table_prints_every_cell_whole(capsys: pytest.CaptureFixture[str]) -> None:
    """``get models | grep`` lost the last variants of a model of many: piped output was cut
    at 400 columns with an ellipsis, and a REASON at 70 characters."""
    variants = [{"name": f"intent-classifier-v{i}-int8", "runtime": "onnx"} for i in range(16)]
    render.objects("Model", [{"metadata": {"name": "intent-classifier", "generation": 3}, "spec": {"variants": variants}}])
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "VARIANTS", "GENERATION"]
    assert row.split(None, 1)[0] == "intent-classifier" and row.rstrip().endswith(" 3")
    assert all(f"intent-classifier-v{i}-int8(onnx)" in row for i in range(16)) and "…" not in row
    reason = "waiting for a GPU: " + ", ".join(f"edge-{i} has none free" for i in range(20))
    render.table(None, ["SITE", "REASON"], [["edge-lyon", reason]])
    assert capsys.readouterr().out.splitlines()[1].split(None, 1) == ["edge-lyon", reason]


class _Handler(loopback.CannedHandler):
    body: bytes = b""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.reply(200, self.body)


@pytest.fixture
def odd_server() -> Iterator[str]:
    """A server answering a list whose object has no spec: something the CLI does not expect."""
    _Handler.body = json.dumps({"kind": "ModelDeployment", "items": [{"metadata": {"name": "x"}}]}).encode()
    with loopback.http_server(_Handler) as url:
        yield url


@pytest.fixture
def serving() -> Iterator[Any]:
    """Serve a given JSON body to every GET; yields a function that sets it and returns the URL."""
    with loopback.http_server(_Handler) as url:

        def serve(body: dict[str, Any] | bytes) -> str:
            _Handler.body = body if isinstance(body, bytes) else json.dumps(body).encode()
            return url

        yield serve


@pytest.mark.parametrize("text", ["rollback [incident-42]", "fix [/wrong] tag", "[bold]not bold[/bold]"])
def test_text_users_wrote_prints_as_written_in_tables(text: str, serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Brackets in an event's reason or a token's description are text, not console markup."""
    event = {"id": 7, "ts": "2026-01-01T00:00:00Z", "actor": "anonymous", "action": "apply", "kind": "", "name": "",
             "reason": text, "details": {}}
    assert cli_main.main(["--server", serving({"items": [event]}), "events"]) == 0
    assert text in capsys.readouterr().out
    token = {"id": "t1", "purpose": "api", "role": "read", "state": "active", "createdAt": "2026-01-01T00:00:00Z",
             "expiresAt": None, "description": text}
    assert cli_main.main(["--server", serving({"kind": "Token", "items": [token]}), "token", "list"]) == 0
    assert text in capsys.readouterr().out


def test_an_answer_python_cannot_read_as_json_is_said_not_a_bug(serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """JSON with an integer of 5,000 digits is past what int() reads."""
    server = serving(b'{"kind": "Site", "items": [' + b"1" * 5000 + b"]}")
    assert cli_main.main(["--server", server, "get", "sites"]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: the control plane answered GET /v1/sites with HTTP 200 and no JSON object"]


def test_an_unexpected_error_is_one_line_and_exit_1(odd_server: str) -> None:
    proc = support.cli("get", "modeldeployments", server_url=odd_server)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: get failed unexpectedly: KeyError")


def test_main_returns_1_in_process(odd_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["--server", odd_server, "get", "modeldeployments"]) == 1
    assert capsys.readouterr().err.startswith("error: get failed unexpectedly")


@pytest.mark.parametrize(("argv", "expected"), [
    (["infer", "m", "--data", "{}", "--location", "abc"], "argument --location: 'abc' is not lat,lon, e.g. 48.85,2.35"),
    (["chat", "m", "hi", "--location", "91,2"], "argument --location: '91,2' is outside -90..90, -180..180"),
    (["chat", "m", "hi", "--location", "nan,2"], "argument --location: 'nan,2' is outside -90..90, -180..180"),
    (["cascade", "tune", "c", "-f", "x.jsonl", "--location", "48.85"], "argument --location: '48.85' is not lat,lon"),
    (["events", "--limit", "0"], "argument --limit: 0 is not from 1 to 10000"),
    (["events", "--limit", "20000"], "argument --limit: 20000 is not from 1 to 10000"),
    (["captures", "EU", "--limit", "-3"], "argument --limit: -3 is not from 1 to 10000"),
    (["distill", "d", "--epochs", "0"], "argument --epochs: 0 is not from 1 to 1000"),
    (["distill", "d", "--min-gain", "nan"], "argument --min-gain: 'nan' is not at least 0 and less than 1"),
    (["distill", "d", "--min-gain", "1"], "argument --min-gain: '1' is not at least 0 and less than 1"),
    (["chat", "m", "hi", "--temperature", "-1"], "argument --temperature: '-1' is not from 0 to 2"),
    (["chat", "m", "hi", "--max-tokens", "0"], "argument --max-tokens: 0 is not 1 or more"),
    (["chat", "m", "hi", "--timeout", "0"], "argument --timeout: '0' is not more than 0"),
    (["events", "--since", "-1"], "argument --since: -1 is not 0 or more"),
    (["simulate", "--each-site", "--top", "0"], "argument --top: 0 is not 1 or more"),
    (["demo", "--requests", "x"], "argument --requests: 'x' is not a whole number"),
    (["serve", "--heartbeat-interval", "nan"], "argument --heartbeat-interval: 'nan' is not from 0.05 to 300"),
    (["serve", "--missed-heartbeats", "0"], "argument --missed-heartbeats: 0 is not from 1 to 100"),
    (["serve", "--leader-lease", "0.5"], "argument --leader-lease: '0.5' is not from 1 to 300"),
    (["serve", "--agent-cert-days", "0"], "argument --agent-cert-days: '0' is not more than 0 and at most 3650"),
    (["serve", "--local-ray-cpus", "-1"], "argument --local-ray-cpus: -1 is not 1 or more"),
    (["serve", "--gateway-burst", "nan"], "argument --gateway-burst: 'nan' is not 0 or more"),
    (["gateway", "--control-plane", "http://x", "--gateway-max-body", "0"], "argument --gateway-max-body: 0 is not 1 or more"),
    (["gateway", "--control-plane", "http://x", "--cold-start-timeout", "601"], "argument --cold-start-timeout: '601' is not from 0 to 600"),
    (["serve", "--first-token-timeout", "0"], "argument --first-token-timeout: '0' is not from 1 to 3600"),
    (["gateway", "--control-plane", "http://x", "--first-token-timeout", "inf"], "argument --first-token-timeout: 'inf' is not from 1 to 3600"),
    # --residency is sent as it is, in printable ASCII; --region and --reason are encoded: one line in any script goes
    (["chat", "m", "hi", "--region", "Île\nde-France"], "argument --region: 'Île\\nde-France': a region is one line of text"),
    (["infer", "m", "--data", "{}", "--residency", "F\tR"], "argument --residency: 'F\\tR': only printable ASCII travels in an HTTP header"),
])
def test_a_bad_caller_option_is_a_usage_error_naming_the_option(argv: list[str], expected: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Caught before any request: the option is named, not the header the server would refuse."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["--server", "http://127.0.0.1:9", *argv])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_location_reaches_the_gateway_as_its_header() -> None:
    args = cli_main.build_parser().parse_args(["infer", "m", "--data", "{}", "--location", "48.85,2.35", "--residency", "FR"])
    assert infer.caller_headers(args) == {"x-edgeplane-location": "48.85,2.35", "x-edgeplane-residency": "FR"}


def test_infer_data_as_a_bare_array_needs_a_model_of_one_input() -> None:
    from orchestrator.cli import infer
    from orchestrator.cli.http import CliError

    def body_of(data: str, declared: dict[str, str]) -> dict[str, Any]:
        return infer.request_of(infer.given_of(infer.read_data(data)), infer.Declared(declared))

    assert body_of("[[1.5, 2.5]]", {"x": "FP64"}) == {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1.5, 2.5]}]}
    with pytest.raises(CliError, match=r'the model takes 2 inputs \(a, b\): give --data as \{"NAME": \[\[...\]\], ...\}'):
        body_of("[[1.5]]", {"a": "FP32", "b": "FP32"})
    with pytest.raises(CliError, match="or an array for a model of one input"):
        body_of('"text"', {"x": "FP32"})


BAD_INPUT = [  # argv ({tmp}: a folder with the files below), environment, exit code, the one line on stderr
    (["--server", "http://[::1", "get", "sites"], {}, 2,
     "error: --server 'http://[::1' is not a URL such as http://127.0.0.1:8080 (Invalid port: ':1')"),
    (["--server", "http://a:b:c", "get", "sites"], {}, 2,
     "error: --server 'http://a:b:c' is not a URL such as http://127.0.0.1:8080 (Invalid port: 'b:c')"),
    (["get", "sites"], {"EDGEPLANE_SERVER": "http://[::1"}, 2,
     "error: EDGEPLANE_SERVER 'http://[::1' is not a URL such as http://127.0.0.1:8080 (Invalid port: ':1')"),
    (["--token", "é☃", "get", "sites"], {}, 2,
     "error: --token: the token has characters a token cannot have (spaces, control or non-ASCII characters)"),
    (["get", "sites"], {"EDGEPLANE_TOKEN": "é☃"}, 2,
     "error: EDGEPLANE_TOKEN: the token has characters a token cannot have (spaces, control or non-ASCII characters)"),
    (["get", "sites"], {"EDGEPLANE_TOKEN_FILE": "{tmp}/binary"}, 2, "error: EDGEPLANE_TOKEN_FILE {tmp}/binary: not UTF-8 text (byte 0)"),
    (["infer", "m", "--data", "[[1]]", "--token", "é☃"], {}, 2,
     "error: --token: the token has characters a token cannot have (spaces, control or non-ASCII characters)"),
    (["chat", "m", "hi", "--token", "a\nb"], {}, 2,
     "error: --token: the token has characters a token cannot have (spaces, control or non-ASCII characters)"),
    (["gateway", "--control-plane", "http://[::1"], {}, 2, "error: --control-plane 'http://[::1' is not a URL (Invalid IPv6 URL)"),
    (["gateway", "--control-plane", "http://127.0.0.1:9", "--token", "é☃"], {}, 2,
     "error: --token: the token has characters a token cannot have (spaces, control or non-ASCII characters)"),
    (["infer", "m", "--data", '{"input": [[NaN]]}'], {}, 2, "error: NaN in the inputs: a tensor sent as JSON holds finite numbers only"),
    (["infer", "m", "--data", "[[1e999]]"], {}, 2, "error: 1e999 in the inputs: a tensor sent as JSON holds finite numbers only"),
    (["infer", "m", "--data", '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [-Infinity]}]}'], {}, 2,
     "error: -Infinity in the inputs: a tensor sent as JSON holds finite numbers only"),
    (["infer", "m", "--data", "[[1" + "0" * 5000 + "]]"], {}, 2, "error: --data: an integer too long to read"),
    (["cascade", "tune", "c", "-f", "{tmp}/huge.jsonl"], {}, 1, "error: {tmp}/huge.jsonl:2: an integer too long to read"),
    (["cascade", "tune", "c", "-f", "{tmp}/deep.jsonl"], {}, 1, "error: {tmp}/deep.jsonl:1: JSON nested too deeply"),
    (["cascade", "tune", "c", "-f", "{tmp}/nan.jsonl"], {}, 1,
     "error: {tmp}/nan.jsonl:1: NaN in the inputs: a tensor sent as JSON holds finite numbers only"),
    (["infer", "m", "--data", "@{tmp}/binary"], {}, 2, "error: {tmp}/binary: not UTF-8 text (byte 0)"),
    (["simulate", "--scenario", "{tmp}/binary"], {}, 1, "error: {tmp}/binary: not UTF-8 text (byte 0)"),
    (["cascade", "tune", "c", "-f", "{tmp}/binary"], {}, 1, "error: {tmp}/binary: not UTF-8 text (byte 0)"),
    (["apply", "-f", "{tmp}/binary.yaml"], {}, 1, "error: {tmp}/binary.yaml: not UTF-8 text (byte 0)"),
    # a file that exists but cannot be read (as one without read permission cannot): the
    # kernel's memory file fails its first read with EIO
    (["apply", "-f", "/proc/self/mem"], {}, 2, "error: /proc/self/mem: Input/output error"),
    (["plan", "-f", "/proc/self/mem"], {}, 2, "error: /proc/self/mem: Input/output error"),
    (["delete", "-f", "{tmp}/list.yaml", "-f", "/proc/self/mem"], {}, 2, "error: /proc/self/mem: Input/output error"),
    (["simulate", "-f", "/proc/self/mem"], {}, 2, "error: /proc/self/mem: Input/output error"),
    (["simulate", "--scenario", "{tmp}/list.yaml"], {}, 1, "error: {tmp}/list.yaml: a scenario is a mapping with kind: Scenario and a spec"),
]


@pytest.mark.parametrize(("argv", "env", "code", "expected"), BAD_INPUT)
def test_bad_input_is_one_line_and_no_request_is_sent(argv: list[str], env: dict[str, str], code: int, expected: str,
                                                      tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything is sent (the server is a closed port): a usage error (2) or the
    input's own problem (1), said in one line; never a traceback, never "this is a bug"."""
    # a PNG's signature: FF FE would be UTF-16's byte-order mark, which a command reads as such
    (tmp_path / "binary").write_bytes(b"\x89PNG\r\n\x1a\n\x00binary")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00binary")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "nan.jsonl").write_text('{"input": [[NaN]], "label": 1}\n')
    (tmp_path / "huge.jsonl").write_text('{"input": [[1.5]], "label": 1}\n{"input": [[1' + "0" * 5000 + ']], "label": 1}\n')
    (tmp_path / "deep.jsonl").write_text('{"input": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    for key in [k for k in os.environ if k.startswith("EDGEPLANE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EDGEPLANE_SERVER", f"http://127.0.0.1:{support.closed_port()}")
    def here(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path))

    for key, value in env.items():
        monkeypatch.setenv(key, here(value))
    assert cli_main.main([here(a) for a in argv]) == code
    assert capsys.readouterr().err.splitlines() == [here(expected)]


def test_a_draining_site_counts_its_replicas_left_in_words() -> None:
    assert render.scheduling({}) == "Schedulable"
    assert render.scheduling({"maintenance": {"state": "Draining", "replicasLeft": 1}}) == "Draining (1 replica left)"
    assert render.scheduling({"maintenance": {"state": "Draining", "replicasLeft": 3}}) == "Draining (3 replicas left)"
    assert render.scheduling({"maintenance": {"state": "Cordoned"}}) == "Cordoned"


@pytest.mark.parametrize(("status", "shown"), [
    ({"health": "Healthy", "power": {"estimatedWatts": 144.0, "budgetWatts": 150.0}}, "144/150"),
    ({"health": "Healthy", "power": {"estimatedWatts": 37.5, "budgetWatts": 1500.0}}, "37.5/1500"),
    # a data hall in plain watts, every digit kept (no 1.23457e+06/2e+06)
    ({"health": "Healthy", "power": {"estimatedWatts": 1234567.8, "budgetWatts": 2000000.0}}, "1234567.8/2000000"),
    ({"health": "Healthy"}, "-"),  # no budget
    ({}, "-"),  # before the first pass
])
def test_a_site_shows_its_estimated_draw_against_its_power_budget(status: dict[str, Any], shown: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    site = {"metadata": {"name": "edge-lyon"}, "spec": {**support.edge_site_spec(), "energy": {"carbonGramsPerKWh": 56, "powerBudgetWatts": 150}},
            "status": status}
    render.objects("Site", [site])
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-3:] == ["POWER", "W", "SOURCE"]
    assert row.split()[-2] == shown, row


def test_a_drain_s_progress_line_counts_its_replicas_left_in_words() -> None:
    from orchestrator.cli import maintenance as cli_maintenance
    assert cli_maintenance.progress_line("s", {"state": "Draining", "replicasLeft": 1}) == "site s: Draining, 1 replica left"
    assert cli_maintenance.progress_line("s", {"state": "Draining", "replicasLeft": 2}) == "site s: Draining, 2 replicas left"


@pytest.mark.parametrize(("tier", "status", "shown"), [
    ("edge", {"agent": {"runtimes": ["onnx", "onnx-genai"]}}, "onnx,onnx-genai"),
    ("edge", {"agent": {"runtimes": ["onnx"]}}, "onnx"),
    ("edge", {"agent": {}}, "-"),  # a control plane of an earlier release does not say
    ("edge", {"health": "NoAgent"}, "-"),
    ("datacenter", {"health": "Healthy"}, "any"),  # its Ray cluster runs every runtime
])
def test_a_site_shows_the_runtimes_its_agent_runs(tier: str, status: dict[str, Any], shown: str) -> None:
    assert render.runtimes({"metadata": {"name": "s"}, "spec": {"tier": tier}, "status": status}) == shown


# What an agent, Ray or an admin wrote into an event's reason or a token's description: a
# line break starting a row of its own, a tab a column, ESC sequences clearing the screen.
FORGED = "Ray said:\n9 anonymous deleted Model everything\tgone\r\x1b[2J\x1b]0;title\x07"
SHOWN = r"Ray said:\n9 anonymous deleted Model everything\tgone\r\x1b[2J\x1b]0;title\x07"


def test_text_users_or_agents_wrote_is_one_line_without_control_characters_in_tables(
        serving: Any, capsys: pytest.CaptureFixture[str]) -> None:
    event = {"id": 7, "ts": "2026-01-01T00:00:00Z", "actor": "anonymous", "action": "apply", "kind": "", "name": "",
             "reason": FORGED, "details": {}}
    assert cli_main.main(["--server", serving({"items": [event]}), "events"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and SHOWN in out and "\x1b" not in out and "\r" not in out, out
    token = {"id": "t1", "purpose": "api", "role": "read", "state": "active", "createdAt": "2026-01-01T00:00:00Z",
             "expiresAt": None, "description": FORGED}
    assert cli_main.main(["--server", serving({"kind": "Token", "items": [token]}), "token", "list"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and SHOWN in out and "\x1b" not in out and "\r" not in out, out


def test_a_followed_event_is_one_line_of_its_columns_whatever_its_reason_holds(serving: Any) -> None:
    event = {"id": 7, "ts": "2026-01-01T00:00:00Z", "actor": "anonymous", "action": "apply", "kind": "", "name": "",
             "reason": FORGED, "details": {}}
    url = serving({"items": [event], "store": "s1", "lastId": 7})
    follower = subprocess.Popen([str(support.EDGEPLANE), "events", "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=support.clean_env(EDGEPLANE_SERVER=url), cwd=support.REPO)
    try:
        assert follower.stdout is not None
        head, row = follower.stdout.readline(), follower.stdout.readline()
    finally:
        follower.send_signal(signal.SIGINT)
        follower.communicate(timeout=30)
    assert head.decode().rstrip("\n").split("\t") == ["ID", "TIME", "ACTOR", "ACTION", "KIND", "NAME", "SITE", "REASON"], head
    assert row.decode().rstrip("\n").split("\t") == ["7", "2026-01-01T00:00:00Z", "anonymous", "apply", "", "", "", SHOWN], row


class _Fleet(loopback.CannedHandler):
    """A control plane whose one deployment failed at a site whose agent reported :data:`FORGED`."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path.split("?")[0]
        deployment = {"metadata": {"name": "intent"}, "status": {"phase": "Failing", "reason": f"edge-1: {FORGED}"}}
        placement = {"deployment": "intent", "site": "edge-1", "replicas": 1, "ready": 0, "reason": FORGED}
        bodies = {"/healthz": {"status": "ok"}, "/v1/sites": {"items": []}, "/v1/modeldeployments": {"items": [deployment]},
                  "/v1/placements": {"items": [placement]}, "/v1/controlplane": {"replica": "r1", "role": "leader"}}
        self.reply(200, json.dumps(bodies[path]).encode())


def test_status_writes_what_agents_reported_on_its_own_lines_without_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    with loopback.http_server(_Fleet) as url:
        assert cli_main.main(["--server", url, "status"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out, out
    assert out.splitlines()[-2:] == [f"  intent: Failing: edge-1: {SHOWN}", f"    waiting: edge-1: {SHOWN}"], out


class _Owned(loopback.CannedHandler):
    """A control plane with a data centre another control plane owns."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path.split("?")[0]
        sites = [{"metadata": {"name": "dc-1"}, "status": {"health": "OwnedElsewhere", "ownedBy": "b" * 16}},
                 {"metadata": {"name": "dc-2"}, "status": {"health": "Healthy"}}]
        bodies = {"/healthz": {"status": "ok"}, "/v1/sites": {"items": sites}, "/v1/modeldeployments": {"items": []},
                  "/v1/placements": {"items": []}, "/v1/controlplane": {"replica": "r1", "role": "leader"}}
        self.reply(200, json.dumps(bodies[path]).encode())


@pytest.mark.parametrize("output", ["text", "json"])
def test_status_says_which_data_centre_another_control_plane_owns_and_whose(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    with loopback.http_server(_Owned) as url:
        assert cli_main.main(["--server", url, "status", *(["-o", "json"] if output == "json" else [])]) == 0
    out = capsys.readouterr().out
    if output == "json":
        assert json.loads(out)["ownedElsewhere"] == {"dc-1": "b" * 16}, out
    else:
        assert "sites: 2 (1 healthy, 1 owned elsewhere)" in out and f"  dc-1: owned by another control plane ({'b' * 16})" in out, out
