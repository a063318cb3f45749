"""``--log-format json`` and ``--access-log`` on ``edgeplane serve`` (its gateway) and
``edgeplane gateway``, real processes: each line of their log is one JSON object, each
request one access line with its id, route, status, bytes and time, and nothing of who sent
it (no address, token, query string or body: docs/security.md). The access log is off
unless asked for. The agent's are tests/agent/test_access_log.py."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import time

import httpx
import pytest

from . import support

BODY = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.5]}]}'
SECRET = "secret-token-42"
FIELDS = {"ts", "level", "logger", "msg", "request_id", "method", "route", "model", "site", "status", "grpc_status", "bytes_in", "bytes_out",
          "duration_ms", "failover", "skipped"}


def serve(tmp: pathlib.Path, *flags: str) -> list[str]:
    return [str(support.EDGEPLANE), "serve", "--data-dir", str(tmp / "cp"), "--port", str(support.free_port()),
            "--agent-port", str(support.free_port()), "--agent-join-port", str(support.free_port()), *flags]


def gateway(_tmp: pathlib.Path, *flags: str) -> list[str]:
    return [str(support.EDGEPLANE), "gateway", "--control-plane", f"http://127.0.0.1:{support.closed_port()}",
            "--host", "127.0.0.1", "--port", "0", *flags]


def started(args: list[str], tmp: pathlib.Path) -> tuple[subprocess.Popen[bytes], str]:
    """The process and the URL it serves, once its banner says so; its log goes to ``tmp/log``."""
    with (tmp / "log").open("wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=support.clean_env(),
                                cwd=support.REPO, start_new_session=True)
    assert proc.stdout is not None
    seen, deadline = b"", time.monotonic() + 60
    while b"http://" not in seen or not seen.endswith(b"\n"):
        assert time.monotonic() < deadline and proc.poll() is None, f"{seen!r}\n{(tmp / 'log').read_text(errors='replace')}"
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"stdout ended: {seen!r}\n{(tmp / 'log').read_text(errors='replace')}"
        seen += chunk
    found = re.findall(r"http://127\.0\.0\.1:\d+", seen.decode())
    assert found, seen
    return proc, found[-1]  # the gateway names the control plane it follows first


def stopped_log(proc: subprocess.Popen[bytes], tmp: pathlib.Path) -> list[str]:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    return (tmp / "log").read_text().splitlines()


@pytest.mark.parametrize("command", [serve, gateway])
def test_json_lines_and_an_access_line_per_request_with_nothing_personal(command, tmp_path: pathlib.Path) -> None:
    proc, url = started(command(tmp_path, "--log-format", "json", "--access-log", "--log-level", "info"), tmp_path)
    try:
        with httpx.Client(base_url=url) as client:
            infer = client.post("/v2/models/mlp/infer?user=alice%40example.org", content=BODY,
                                headers={"X-Request-Id": "req-gw-0001", "Authorization": f"Bearer {SECRET}"})
            missing = client.get("/no/such/path/bob", headers={"X-Request-Id": "req-gw-0002"})
    finally:
        lines = stopped_log(proc, tmp_path)
    records = [json.loads(line) for line in lines]  # every line: one JSON object (uvicorn's, gRPC's and ours)
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() and r["ts"].endswith("Z") for r in records), lines
    access = {r["request_id"]: r for r in records if r["logger"] == "edgeplane.access"}
    line = access["req-gw-0001"]
    # no model is deployed: the name is the caller's text, which the line does not hold
    assert (line["method"], line["route"], line["model"], line["status"]) == ("POST", "/v2/models/{model}/infer", None, infer.status_code)
    assert line["bytes_in"] in (0, len(BODY))  # the body bytes read: none when refused before its body (no endpoint table yet)
    assert line["bytes_out"] == len(infer.content) and line["duration_ms"] >= 0 and line["site"] is None
    assert (access["req-gw-0002"]["route"], access["req-gw-0002"]["status"]) == (None, missing.status_code)
    for r in access.values():  # these fields and no others: nothing of the caller's address
        assert r.keys() == FIELDS and "127.0.0.1" not in json.dumps(r), r
    for text in lines:  # nor of the token, the query string, a path no route has or the body, anywhere
        assert SECRET not in text and "alice" not in text and "bob" not in text and '"inputs"' not in text


#: Model names as a caller may write them in a path (percent-encoded, decoded by the server):
#: an e-mail address, then a line break and what would read as an access line of its own; ESC
#: sequences that colour and clear the operator's terminal, a carriage return and a C1 CSI;
#: 10,000 characters.
UNKNOWN = ("carol%40example.org%0A2025-05-02%2010%3A02%3A03%2C412%20INFO%20edgeplane.access%3A%20forged",
           "mlp%0D%1B%5B31m%1B%5B2J%C2%9Bforged", "m" * 10_000)


@pytest.mark.parametrize("command", [serve, gateway])
def test_a_model_name_the_gateway_does_not_know_is_not_written(command, tmp_path: pathlib.Path) -> None:
    """A model's name in a path is the caller's text until the gateway knows it: written, it
    put an e-mail address in the log, in text a line break and a line of the caller's, ESC
    sequences that acted on the terminal of an operator reading it, and 10,000 characters on
    one line. Each request has its one access line, model=-, and the log none of that."""
    proc, url = started(command(tmp_path, "--access-log", "--log-level", "info"), tmp_path)
    try:
        with httpx.Client(base_url=url) as client:
            answers = {f"req-gw-01{i}": client.post(f"/v2/models/{name}/infer", content=BODY, headers={"X-Request-Id": f"req-gw-01{i}"})
                       for i, name in enumerate(UNKNOWN)}
    finally:
        lines = stopped_log(proc, tmp_path)
    for request_id, answer in answers.items():
        assert answer.status_code in (404, 503), answer.text
        [line] = [text for text in lines if request_id in text]
        assert f" POST /v2/models/{{model}}/infer model=- site=- status={answer.status_code} " in line, line
    assert not any("carol" in text or "forged" in text or "m" * 100 in text for text in lines), lines
    raw = (tmp_path / "log").read_bytes()
    assert b"\x1b" not in raw and b"\r" not in raw and "\x9b".encode() not in raw, raw


@pytest.mark.parametrize("command", [serve, gateway])
def test_no_access_log_unless_asked_and_text_stays_the_default(command, tmp_path: pathlib.Path) -> None:
    proc, url = started(command(tmp_path, "--log-level", "info"), tmp_path)
    try:
        httpx.get(f"{url}/v2/health/live", headers={"X-Request-Id": "req-gw-0003"})
    finally:
        lines = stopped_log(proc, tmp_path)
    assert lines and not any(line.startswith("{") for line in lines), lines
    assert not any("req-gw-0003" in line or "edgeplane.access" in line for line in lines), lines


@pytest.mark.parametrize("command", [["serve"], ["gateway", "--control-plane", "http://127.0.0.1:8080"]])
def test_an_unknown_log_format_is_a_one_line_usage_error(command: list[str], tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([str(support.EDGEPLANE), *command, "--log-format", "xml"], capture_output=True, text=True,
                          timeout=60, env=support.clean_env(), cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == f"edgeplane {command[0]}: error: argument --log-format: invalid choice: 'xml' (choose from 'text', 'json')"
    assert list(tmp_path.iterdir()) == []

