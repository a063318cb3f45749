"""Nothing edgeplane runs reports to a third party: onnxruntime's own telemetry (on by default
in its Linux builds from 1.29, started when the library is first imported) is switched off
before any of edgeplane's modules imports onnxruntime, in the agent, the data-centre
replicas and the distillation job alike; an operator's own setting is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import importlib, os, sys
importlib.import_module(sys.argv[1])
assert "onnxruntime" in sys.modules, "the module was expected to import onnxruntime"
print(os.environ.get("ORT_DISABLE_TELEMETRY"))
"""

MODULES = ["edge_agent.runtime.onnx", "edge_agent.runtime.genai", "orchestrator.serving.onnx_app", "orchestrator.serving.genai_app",
           "orchestrator.distill.job"]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(("operators", "seen"), [(None, "1"), ("0", "0")])
def test_onnxruntime_is_imported_with_its_telemetry_off(module: str, operators: str | None, seen: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    if operators is not None:
        env["ORT_DISABLE_TELEMETRY"] = operators
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [seen]
