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
FIELDS = {"ts", "level", "logger", "msg", "request_id", "method", "route", "model", "site", "status", "bytes_in", "bytes_out",
          "duration_ms"}


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


#: A model's name as a caller may write it in a path: an e-mail address, and a line break
#: followed by what would read as an access line of its own.
FORGED = "carol%40example.org%0A2025-05-02%2010%3A02%3A03%2C412%20INFO%20edgeplane.access%3A%20forged"


@pytest.mark.parametrize("command", [serve, gateway])
def test_a_model_name_the_gateway_does_not_know_is_not_written(command, tmp_path: pathlib.Path) -> None:
    """A model's name in a path is the caller's text until the gateway knows it: written, it
    put an e-mail address in the log, and in text a line break and a line of the caller's."""
    proc, url = started(command(tmp_path, "--access-log", "--log-level", "info"), tmp_path)
    try:
        with httpx.Client(base_url=url) as client:
            answer = client.post(f"/v2/models/{FORGED}/infer", content=BODY, headers={"X-Request-Id": "req-gw-0004"})
    finally:
        lines = stopped_log(proc, tmp_path)
    assert answer.status_code in (404, 503), answer.text
    [line] = [text for text in lines if "req-gw-0004" in text]
    assert f" POST /v2/models/{{model}}/infer model=- site=- status={answer.status_code} " in line, line
    assert not any("carol" in text or "forged" in text for text in lines), lines


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


# A model name that spells a second log line, colours the operator's terminal and clears it
# (percent-encoded in the path, decoded by the server), and one of 10,000 characters.
FORGED_PATH = "/v2/models/mlp%0A2025-05-02%2010:02:03,412%20INFO%20edgeplane.access:%20forged%0D%1B%5B31m%1B%5B2J%C2%9B/infer"


@pytest.mark.parametrize("command", [serve, gateway])
def test_a_path_of_control_characters_gives_one_access_line_with_nothing_a_terminal_acts_on(command, tmp_path: pathlib.Path) -> None:
    proc, url = started(command(tmp_path, "--access-log"), tmp_path)
    try:
        with httpx.Client(base_url=url) as client:
            client.post(FORGED_PATH, content=BODY, headers={"X-Request-Id": "req-gw-0004"})
            client.post(f"/v2/models/{'m' * 10_000}/infer", content=BODY, headers={"X-Request-Id": "req-gw-0005"})
    finally:
        stopped_log(proc, tmp_path)
    text = (tmp_path / "log").read_bytes()
    assert b"\x1b" not in text and b"\r" not in text and "\x9b".encode() not in text, text
    lines = text.decode().splitlines()
    forged = [line for line in lines if "req-gw-0004" in line]
    assert len(forged) == 1 and not any("forged" in line and "req-gw-0004" not in line for line in lines), lines
    assert " model=- site=- " in forged[0], forged  # a name the gateway does not know is not written at all
    long = [line for line in lines if "req-gw-0005" in line]
    assert len(long) == 1 and " model=- site=- " in long[0], long
