"""What the control plane takes an agent to run: what it reports; an agent of a release
before agents reported their runtimes ran "onnx" for sure, and a generative model only where
it serves one now (docs/agent.md, "Runtimes")."""

from __future__ import annotations

import pytest

from orchestrator.agents import model as agent_model
from orchestrator.reconciler import inventory
from orchestrator.scheduler.model import Runtime

ONNX, GENAI = Runtime.ONNX, Runtime.ONNX_GENAI


def agent(runtimes: tuple[str, ...], models: dict[str, agent_model.ModelState] | None = None) -> agent_model.AgentStatus:
    return agent_model.AgentStatus(
        site="edge-x", agent_id="a", endpoint_url="http://127.0.0.1:1", healthy=True, last_heartbeat=1.0, joined_at=0.0,
        location=agent_model.Location(), labels={}, agent_version="test",
        capacity=agent_model.Capacity(2, 1 << 30, runtimes=runtimes), providers=(), inflight=0, cpu_percent=0.0,
        memory_available_bytes=0, models=models or {}, assignment_version=1, heartbeat_interval=1.0,
    )


def state(name: str, serving: bool) -> agent_model.ModelState:
    phase = agent_model.ModelPhase.READY if serving else agent_model.ModelPhase.FAILED
    return agent_model.ModelState(name, "a" * 64, phase, serving_sha256="a" * 64 if serving else "")


CHAT = agent_model.Assignment("chat", "chat-fr", "small", "http://cp/chat.tar", "a" * 64, runtime="onnx-genai")
TINY = agent_model.Assignment("tiny", "tiny-fr", "cpu", "http://cp/tiny.onnx", "b" * 64)


@pytest.mark.parametrize(
    ("reported", "models", "sent", "runs"),
    [
        (("onnx", "onnx-genai"), {}, (), {ONNX, GENAI}),
        (("onnx",), {}, (), {ONNX}),
        # reported: taken as said, even beside a generative model it serves (its operator took it away)
        (("onnx",), {"chat": state("chat", True)}, (CHAT,), {ONNX}),
        # a runtime of a later release is no runtime the scheduler places
        (("onnx", "tensorrt-llm"), {}, (), {ONNX}),
        # none reported: an agent of an earlier release
        ((), {}, (), {ONNX}),
        ((), {"tiny": state("tiny", True)}, (TINY,), {ONNX}),
        ((), {"chat": state("chat", True)}, (CHAT,), {ONNX, GENAI}),  # it serves one: it runs it
        ((), {"chat": state("chat", False)}, (CHAT,), {ONNX}),  # it failed to load it: it may well not
        ((), {"chat": state("chat", True)}, (), {ONNX}),  # not sent by this control plane: nothing known of it
    ],
    ids=["both", "onnx", "reported-wins", "unknown-name", "legacy", "legacy-onnx-model", "legacy-serving-genai",
         "legacy-failed-genai", "legacy-unsent"],
)
def test_an_agent_runs_what_it_reports_or_what_an_earlier_release_ran(reported, models, sent, runs) -> None:
    assert inventory.agent_runtimes(agent(reported, models), sent) == runs


def test_runtimes_go_to_the_wire_and_back() -> None:
    capacity = agent_model.Capacity(2, 1 << 30, (), ("CPUExecutionProvider",), ("onnx", "onnx-genai"))
    assert agent_model.Capacity.from_proto(capacity.to_proto()) == capacity
    assert agent_model.Capacity.from_proto(agent_model.Capacity(2, 1 << 30).to_proto()).runtimes == ()
