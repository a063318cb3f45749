"""An agent reports the model runtimes it runs with its capacity, at the join and in its
heartbeats (``edgeplane-agent --runtimes`` narrows them), and a model of another runtime,
which a control plane of an earlier release may still send, fails at once saying so: nothing
is downloaded for it, and the agent's other models serve on."""

from __future__ import annotations

from edge_agent import runtime
from orchestrator.agents import model

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent, Models
from .test_agent import assignment, wait_model


async def test_an_agent_reports_the_runtimes_installed_here(control_plane: ControlPlane, make_agent: MakeAgent) -> None:
    await make_agent(control_plane)
    joined = await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    assert joined.status.capacity.runtimes == runtime.installed() == ("onnx", "onnx-genai")


async def test_a_model_of_a_runtime_the_agent_does_not_offer_fails_before_its_download(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models, artifact_server: ArtifactServer
) -> None:
    agent = await make_agent(control_plane, runtimes=("onnx",))
    joined = await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    assert joined.status.capacity.runtimes == ("onnx",)
    chat = model.Assignment("chat", "assistant", "small", artifact_server.url("chat.tar"), "c" * 64, runtime="onnx-genai")
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1), chat], version=1)
    failed = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.FAILED, name="chat")
    assert failed.message.startswith("this agent does not run onnx-genai models (it runs: onnx); retrying in"), failed.message
    assert artifact_server.attempts("chat.tar") == 0
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    assert agent.registry.get("mlp") is not None and agent.registry.get("chat") is None
