"""What an idle agent holding one ONNX model keeps resident: modules that only some paths
need stay out of it, onnxruntime's telemetry client is never started, and the model's file
is not held beside its loaded weights; each would cost memory for as long as the agent
runs (docs/agent.md, "What was cut")."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from edge_agent import assignments, main, state
from edge_agent.runtime import onnx
from orchestrator.testing import onnx_models

#: Imported only by a generative model's load or by pruning its unpacked versions; shutil
#: (with bz2 and lzma) also by argparse's help formatter, unless given a width; simdjson
#: (with the codec's reader of long JSON bodies) by the first JSON body of 4 KB or more.
LAZY = ("edge_agent.packages", "edge_agent.runtime.genai", "shutil", "bz2", "lzma", "simdjson",
        "edgeplane_proto.oip_reader")

#: An agent started as ``edgeplane-agent`` starts it (flags through ``main.parser``), with
#: a saved assignment set, so that it loads and serves the model without a control plane
#: (the uplink keeps retrying 127.0.0.1:1 meanwhile).
AGENT = """
import asyncio, sys
import numpy as np
from edge_agent import main
from edgeplane_proto import oip

async def infer(url: str, batch: int, binary: bool) -> None:
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    body, length = oip.encode_request({"input": np.ones((batch, 8), np.float32)}, binary=binary)
    head = f"Inference-Header-Content-Length: {length}\\r\\n" if binary else ""
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v2/models/tiny/infer HTTP/1.1\\r\\nHost: agent\\r\\nContent-Length: {len(body)}\\r\\n"
                 f"{head}Connection: close\\r\\n\\r\\n".encode() + body)
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]

args = main.parser().parse_args(["--control-plane", "127.0.0.1:1", "--site", "edge-1", "--token", "t", "--insecure",
                                 "--listen", "127.0.0.1:0", "--data-dir", sys.argv[1], "--allow-file-artifacts"])

async def serve() -> None:
    from edge_agent import daemon

    agent = daemon.Agent(main.config_from_args(args))
    await agent.start()
    try:
        for _ in range(600):  # bounded: the first pass of the reconcile loop, model loaded
            if agent.server.ready and agent.registry.get("tiny") is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("the saved model never served")
        for batch, binary in ((16, True), (4, False), *[(int(b), False) for b in sys.argv[2:3] if b.isdigit()]):
            await infer(agent.endpoint_url, batch, binary)
    finally:
        await agent.stop()

asyncio.run(serve())
print(sorted(set(sys.argv[2:]) & set(sys.modules)))
"""


def test_an_agent_serving_an_onnx_model_imports_only_what_its_requests_need(tmp_path: pathlib.Path) -> None:
    model = onnx_models.build_mlp(tmp_path / "tiny.onnx")
    data_dir = tmp_path / "agent"
    assignment = assignments.Assignment("tiny", "tiny", "cpu", model.path.as_uri(), model.sha256)
    state.StateStore(data_dir).save_assignments("edge-1", assignments.AssignmentSet(1, (assignment,)))
    out = subprocess.run([sys.executable, "-c", AGENT, str(data_dir), *LAZY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # after a binary request and a short JSON one
    # A JSON body of 4 KB or more brings the long-body reader in, and is answered.
    out = subprocess.run([sys.executable, "-c", AGENT, str(data_dir), "256", *LAZY], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['edgeplane_proto.oip_reader', 'simdjson']"


@pytest.mark.parametrize("columns", ["60", "120", ""])
def test_help_is_as_wide_as_argparse_makes_it(columns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The width argparse takes from shutil (COLUMNS, else the terminal, else 80), found without it."""
    monkeypatch.setenv("COLUMNS", columns)
    ours = main.parser()
    argparses = main.parser()
    argparses.formatter_class = argparse.HelpFormatter
    assert ours.format_help() == argparses.format_help()


TELEMETRY = """
import os, sys
from edge_agent import main

code = main.main(["--control-plane", "127.0.0.1:1", "--site", "edge-1", "--data-dir", sys.argv[1]])  # no token: exits at once
print(code, os.environ.get("ORT_DISABLE_TELEMETRY"), "onnxruntime" in sys.modules)
"""


@pytest.mark.parametrize(("operators", "agents"), [(None, "1"), ("0", "0")])
def test_the_agent_turns_onnxruntimes_telemetry_off_before_importing_it(
        operators: str | None, agents: str, tmp_path: pathlib.Path) -> None:
    """onnxruntime's Linux builds (1.29 on) start a telemetry client at import unless
    ORT_DISABLE_TELEMETRY is set: 2.6 MB of the idle agent, and it would send each
    session's model names and hashes off the site. An operator's own setting is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "EDGEPLANE_TOKEN")}
    if operators is not None:
        env["ORT_DISABLE_TELEMETRY"] = operators
    out = subprocess.run([sys.executable, "-c", TELEMETRY, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=True, timeout=60).stdout
    assert out.split() == ["2", agents, "False"]  # set before anything imported onnxruntime


def test_a_session_on_the_cpu_lets_go_of_the_model_bytes(tmp_path: pathlib.Path) -> None:
    """onnxruntime's Python session would keep the bytes it was made from for good (to make
    the session again on a fallback provider): a second copy of the model file, resident."""
    data = onnx_models.build_mlp(tmp_path / "m.onnx").path.read_bytes()
    held = sys.getrefcount(data)
    model = onnx.OnnxModel.load(data, providers=["CPUExecutionProvider"])
    assert sys.getrefcount(data) == held  # nothing but this test holds them: freed with the caller's reference
    x = np.ones((2, 8), dtype=np.float32)
    assert model.run(model.feeds([("input", x, "FP32")]), model.output_names([]))[0].shape == (2, 4)
