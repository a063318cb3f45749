"""``edgeplane-agent --log-format json --access-log`` as a real process: every line it logs
is one JSON object a log shipper reads, and each request it answers one access line that
names the request and nothing of the person who sent it (docs/security.md)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys

import grpc
import httpx

from edgeplane_proto.inference.v2 import inference_pb2 as pb
from orchestrator import ports

from .conftest import TOKEN, ControlPlane

SITE = "edge-logs-1"
FIELDS = {"ts", "level", "logger", "msg", "request_id", "method", "route", "model", "site", "status", "grpc_status",
          "bytes_in", "bytes_out", "duration_ms", "failover", "skipped"}
AGENT = pathlib.Path(sys.executable).parent / "edgeplane-agent"
#: Model names as a caller may write them in a path (percent-encoded, decoded by the server):
#: an e-mail address, then a line break and what would read as a log line of its own; ESC
#: sequences that colour and clear the operator's terminal, a carriage return and a C1 CSI;
#: 10,000 characters.
UNKNOWN = ("carol%40example.org%0A2025-05-02%2010%3A02%3A03%2C412%20INFO%20edgeplane.access%3A%20forged",
           "mlp%0D%1B%5B31m%1B%5B2J%C2%9Bforged", "m" * 10_000)


def agent_command() -> list[str]:
    return [str(AGENT)] if AGENT.exists() else [sys.executable, "-m", "edge_agent.main"]


async def run_agent(cp: ControlPlane, data_dir: pathlib.Path, *flags: str) -> tuple[str, asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *agent_command(), "--control-plane", cp.target, "--site", SITE, "--token", TOKEN, "--listen", "127.0.0.1:0",
        "--data-dir", str(data_dir), "--heartbeat-interval", "0.5", "--drain-timeout", "2", "--insecure", "--country", "FR",
        *flags, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = (await proc.stdout.readline()).decode()
    assert line.startswith("serving "), f"agent did not start: {line!r}"
    return line.split()[1], proc


async def stopped_log(proc: asyncio.subprocess.Process) -> list[str]:
    """What the agent wrote on stderr, once stopped with SIGTERM."""
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        err = await proc.stderr.read()
        assert await proc.wait() == 0
    return err.decode().splitlines()


async def test_a_json_access_line_names_the_request_and_not_who_sent_it(control_plane: ControlPlane, tmp_path: pathlib.Path) -> None:
    url, proc = await run_agent(control_plane, tmp_path / "agent", "--log-format", "json", "--access-log", "--log-level", "info")
    body = b'{"inputs": []}'
    async with httpx.AsyncClient(base_url=url) as client:
        answer = await client.post("/v2/models/mlp/infer?user=alice%40example.org", content=body,
                                   headers={"X-Request-Id": "req-logs-0001", "Authorization": "Bearer secret-token-42"})
        assert answer.status_code == 404
        assert (await client.get("/v2/health/live", headers={"X-Request-Id": "req-logs-0002"})).status_code == 200
    lines = await stopped_log(proc)
    records = [json.loads(line) for line in lines]  # every line: one JSON object, none a traceback or plain text
    assert all({"ts", "level", "logger", "msg"} <= r.keys() and r["ts"].endswith("Z") for r in records), records
    access = {r["request_id"]: r for r in records if r["logger"] == "edgeplane.access"}
    infer = access["req-logs-0001"]
    # mlp is not assigned here: the name is the caller's text, which the line does not hold
    assert (infer["method"], infer["route"], infer["model"], infer["status"], infer["bytes_in"]) == (
        "POST", "/v2/models/{model}/infer", None, 404, len(body))
    assert infer["bytes_out"] > 0 and infer["duration_ms"] >= 0 and infer["level"] == "info"
    live = access["req-logs-0002"]
    assert (live["route"], live["status"], live["model"]) == ("/v2/health/live", 200, None)
    for r in access.values():  # these fields and no others: nothing of the caller's address
        assert r.keys() == FIELDS and "127.0.0.1" not in json.dumps(r), r
    for line in lines:  # nor of the token, the query string or the body, anywhere
        assert "secret-token-42" not in line and "alice" not in line and '"inputs"' not in line


async def test_a_grpc_call_has_its_access_line_with_the_same_fields(control_plane: ControlPlane, tmp_path: pathlib.Path) -> None:
    """Over gRPC (--grpc-listen) as over HTTP: one line a call, its id from the x-request-id
    metadata, the method's path as its route, the model only when it is one the agent serves,
    and the call's gRPC code by name in its own field (status, a number on HTTP lines, null);
    in text a name of the caller's is never written."""
    port = ports.free_port()
    url, proc = await run_agent(control_plane, tmp_path / "agent", "--log-format", "json", "--access-log", "--log-level", "info",
                                "--grpc-listen", f"127.0.0.1:{port}")
    request = pb.ModelInferRequest(model_name=UNKNOWN[0], inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32",
                                                                                                        shape=[1])])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=pb.ServerLiveRequest.SerializeToString,
                                   response_deserializer=pb.ServerLiveResponse.FromString)
        try:
            await infer(request, metadata=(("x-request-id", "req-grpc-0001"),))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("a model not served was answered")
        assert (await live(pb.ServerLiveRequest(), metadata=(("x-request-id", "req-grpc-0002"),))).live
    lines = await stopped_log(proc)
    access = {r["request_id"]: r for r in map(json.loads, lines) if r["logger"] == "edgeplane.access"}
    call = access["req-grpc-0001"]
    assert (call["method"], call["route"], call["model"], call["status"], call["grpc_status"], call["bytes_in"]) == (
        "POST", "/inference.GRPCInferenceService/ModelInfer", None, None, "NOT_FOUND", request.ByteSize())
    assert call.keys() == FIELDS and call["duration_ms"] >= 0 and call["bytes_out"] == 0, call
    answered = access["req-grpc-0002"]
    assert (answered["route"], answered["grpc_status"], answered["model"]) == ("/inference.GRPCInferenceService/ServerLive", "OK", None)
    assert answered["bytes_out"] == pb.ServerLiveResponse(live=True).ByteSize()
    assert not any("carol" in line or "forged" in line for line in lines), lines


async def test_a_model_name_the_agent_does_not_serve_is_not_written(control_plane: ControlPlane, tmp_path: pathlib.Path) -> None:
    """A model's name in a path is the caller's text until the agent knows it: written, it put
    an e-mail address in the log, in text a line break and a line of the caller's, ESC
    sequences that acted on the terminal of an operator reading it, and 10,000 characters on
    one line. Each request has its one access line, model=-, and the log none of that."""
    url, proc = await run_agent(control_plane, tmp_path / "agent", "--access-log", "--log-level", "info")
    forged, terminal = UNKNOWN[0], UNKNOWN[1]
    paths = (f"/v2/models/{forged}/infer", f"/v2/models/{forged}/ready", f"/v1/models/{forged}",
             f"/v2/models/{terminal}/infer", f"/v2/models/{UNKNOWN[2]}/infer")
    async with httpx.AsyncClient(base_url=url) as client:
        for path in paths:
            method = "POST" if path.endswith("/infer") else "GET"
            answer = await client.request(method, path, content=b"{}" if method == "POST" else None,
                                          headers={"X-Request-Id": f"req-logs-{len(path)}"})
            assert answer.status_code == 404, answer.text
    lines = await stopped_log(proc)
    access = [line for line in lines if "edgeplane.access" in line]
    assert len(access) == len(paths) and all(" model=- site=- status=404 " in line for line in access), lines
    assert not any("carol" in line or "forged" in line or "m" * 100 in line for line in lines), lines
    assert not any("\x1b" in line or "\x9b" in line for line in lines), lines


async def test_without_access_log_no_request_is_logged_and_text_stays_the_default(control_plane: ControlPlane,
                                                                                  tmp_path: pathlib.Path) -> None:
    url, proc = await run_agent(control_plane, tmp_path / "agent", "--log-level", "info")
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/v2/health/live", headers={"X-Request-Id": "req-logs-0003"})).status_code == 200
    lines = await stopped_log(proc)
    assert lines and not any(line.startswith("{") for line in lines), lines
    assert not any("req-logs-0003" in line or "edgeplane.access" in line for line in lines), lines


def test_a_bad_log_format_is_a_one_line_usage_error(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([*agent_command(), "--control-plane", "127.0.0.1:1", "--site", SITE, "--token", TOKEN, "--log-format", "xml"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == "edgeplane-agent: error: argument --log-format: invalid choice: 'xml' (choose from 'text', 'json')"
    assert list(tmp_path.iterdir()) == []

