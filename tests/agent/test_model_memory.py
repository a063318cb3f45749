"""A model whose load does not fit in the memory the agent has is refused alone, before
onnxruntime allocates a byte of it, so that the agent (and every model it serves) is not
killed for want of memory: real onnxruntime, real downloads, the memory read from cgroup
files the tests write, or following what the agent's registry serves."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pathlib
import threading
from collections.abc import Sequence

import httpx
import numpy as np
import pytest

from edge_agent import capacity, daemon, footprint, inflight, registry
from edge_agent.runtime import onnx
from orchestrator.agents import model
from orchestrator.testing import onnx_models

from . import genai_serving
from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent, Models
from .test_agent import assignment, infer, wait_model
from .test_capacity import fake_proc, files

MB = 1 << 20
FAST_RETRY = registry.RetryPolicy(initial=0.05, maximum=0.2)


class Large:
    """Two ONNX models of 48 MB each (an MLP 1024 -> 3072 -> 3072 -> 16)."""

    def __init__(self, server: ArtifactServer) -> None:
        self.a = onnx_models.build_mlp(server.root / "large-a.onnx", in_dim=1024, hidden=3072, out_dim=16, layers=3, seed=0)
        self.b = onnx_models.build_mlp(server.root / "large-b.onnx", in_dim=1024, hidden=3072, out_dim=16, layers=3, seed=1)
        self.a_url, self.b_url = server.url("large-a.onnx"), server.url("large-b.onnx")
        self.size = self.a.path.stat().st_size


@pytest.fixture(scope="module")
def large(artifact_server: ArtifactServer) -> Large:
    return Large(artifact_server)


def contained(root: pathlib.Path, limit: int, used: int) -> capacity.CapacityProbe:
    """A probe that reads a container's cgroup v2 files: ``limit`` bytes, ``used`` of them in use."""
    cgroups = root / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory")
    files(cgroups / "agent", memory_max=str(limit), memory_current=str(used))
    return capacity.CapacityProbe(lambda: ["CPUExecutionProvider"], gpus=lambda: (), proc=fake_proc(root, "0::/agent\n"),
                                  cgroup_root=cgroups)


class Serving(capacity.CapacityProbe):
    """Room for ``limit`` bytes less ``size`` for each model the registry serves (a model
    keeps about its file's size once loaded): what is free follows what serves, whatever
    else the test process holds."""

    def __init__(self, limit: int, size: int) -> None:
        super().__init__(lambda: ["CPUExecutionProvider"], gpus=lambda: ())
        self.limit, self.size = limit, size
        self.registry: registry.ModelRegistry | None = None

    def memory_available(self) -> int:
        return self.limit - self.size * len(self.registry.serving() if self.registry is not None else ())


async def states(cp: ControlPlane, names: Sequence[str], settled: set[model.ModelPhase]) -> dict[str, model.ModelState]:
    """The first reported states in which every model named is in one of ``settled``."""
    def match(event: model.AgentEvent) -> bool:
        return event.kind is model.AgentEventKind.MODELS_CHANGED and all(
            n in event.status.models and event.status.models[n].phase in settled for n in names)

    event = await cp.events.wait_for(match, timeout=60)
    return {n: event.status.models[n] for n in names}


async def test_a_model_too_large_for_the_containers_memory_is_refused_and_the_others_serve(
        control_plane: ControlPlane, make_agent: MakeAgent, models: Models, large: Large, tmp_path: pathlib.Path) -> None:
    # 1 GiB container with 100 MB free: the small model loads, the 48 MB one (about 3 x 48 MB
    # while onnxruntime builds its session) is refused with the arithmetic, and retried.
    probe = contained(tmp_path, 1 << 30, (1 << 30) - 100 * MB)
    agent = await make_agent(control_plane, probe=probe, model_retry=FAST_RETRY)
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1),
                                             assignment(large.a_url, large.a, name="large")], version=1)
    seen = await states(control_plane, ["mlp", "large"], {model.ModelPhase.READY, model.ModelPhase.FAILED})
    assert seen["mlp"].phase is model.ModelPhase.READY
    refused = seen["large"]
    assert refused.phase is model.ModelPhase.FAILED, refused
    need = 3 * large.size / MB
    assert f"needs about {need:.1f} MB of memory to load (3 x its {large.size / MB:.1f} MB file)" in refused.message
    assert "and 100.0 MB are available to this agent" in refused.message
    assert "retrying in" in refused.message
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        await infer(client, np.ones((1, 8), np.float32))
        assert (await client.get("/v2/models/large/ready")).status_code != 200


async def test_a_set_of_more_models_than_fit_loads_what_fits_and_refuses_the_rest(
        control_plane: ControlPlane, make_agent: MakeAgent, large: Large) -> None:
    # Room for one model's load (3 x 48 MB) and a half to spare, beside the least requests in
    # flight may hold: the first model loaded keeps 1 x its size, so the second's load no
    # longer fits. Loads take turns, so the second is weighed after the first took its share,
    # not beside it.
    probe = Serving(7 * large.size // 2 + inflight.MIN_DEFAULT_BYTES, large.size)
    agent = await make_agent(control_plane, probe=probe, model_retry=FAST_RETRY)
    probe.registry = agent.registry
    control_plane.hub.set_assignments(SITE, [assignment(large.a_url, large.a, name="large-a"),
                                             assignment(large.b_url, large.b, name="large-b")], version=1)
    seen = await states(control_plane, ["large-a", "large-b"], {model.ModelPhase.READY, model.ModelPhase.FAILED})
    phases = sorted(s.phase.name for s in seen.values())
    assert phases == ["FAILED", "READY"], seen
    loaded = next(n for n, s in seen.items() if s.phase is model.ModelPhase.READY)
    refused = next(n for n, s in seen.items() if s.phase is model.ModelPhase.FAILED)
    assert "MB are available to this agent" in seen[refused].message
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        answer = await client.post(f"/v2/models/{loaded}/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 1024], "data": [0.5] * 1024}]})
        assert answer.status_code == 200, answer.text
    # The loaded one unassigned, its memory goes back and the other fits at its next attempt.
    urls = {"large-a": (large.a_url, large.a), "large-b": (large.b_url, large.b)}
    control_plane.hub.set_assignments(SITE, [assignment(*urls[refused], name=refused)], version=2)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY, name=refused)
    await asyncio.wait_for(agent.registry.settled(), 30)
    assert agent.registry.get(loaded) is None


async def test_a_generative_model_is_weighed_with_the_kv_cache_of_every_sequence_it_may_run(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: genai_serving.Packages, tmp_path: pathlib.Path) -> None:
    slow = packages.slow  # context 4096
    kv = slow.kv_bytes_per_token * slow.context_length
    # its weights and the caches of 8 sequences, beside the least requests in flight may hold
    free = int(1.25 * slow.size_bytes) + 8 * kv + inflight.MIN_DEFAULT_BYTES
    agent = await make_agent(control_plane, probe=contained(tmp_path, 1 << 30, (1 << 30) - free), model_retry=FAST_RETRY)
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(packages.slow_url, slow.sha256, concurrent=64)], version=1)
    refused = await genai_serving.wait_state(control_plane, lambda s: s.phase is model.ModelPhase.FAILED)
    assert f"{64 * kv / MB:.1f} MB of KV cache for 64 sequence(s) of 4096 tokens" in refused.message
    assert f"and {free / MB:.1f} MB are available to this agent" in refused.message
    assert agent.registry.get(genai_serving.MODEL) is None
    # As many sequences as its memory holds: it loads and answers.
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(packages.slow_url, slow.sha256, concurrent=8)], version=2)
    await genai_serving.wait_state(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        answer = await client.post("/v1/completions", json={"model": genai_serving.MODEL, "prompt": "The agent", "max_tokens": 2})
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(("need", "available", "kept", "refused"), [
    (footprint.onnx_need(100 * MB), None, 0, False),  # not measured: no refusal
    (footprint.onnx_need(100 * MB), 300 * MB, 0, False),  # exactly what it needs
    (footprint.onnx_need(100 * MB), 300 * MB - 1, 0, True),
    (footprint.onnx_need(100 * MB), 300 * MB, 1, True),  # not beside what requests in flight may hold
    (footprint.onnx_need(100 * MB), 316 * MB, 16 * MB, False),
    (footprint.genai_need(100 * MB, 1024, 2048, 4), 125 * MB + 8 * MB, 0, False),
    (footprint.genai_need(100 * MB, 1024, 2048, 4), 125 * MB + 8 * MB - 1, 0, True),
    (footprint.genai_need(100 * MB, 0, 0, 4), 125 * MB, 0, False),  # its KV cache's shape unknown: weights alone
])
def test_what_a_load_needs_against_what_is_free(need: footprint.Need, available: int | None, kept: int, refused: bool) -> None:
    assert (footprint.refusal(need, available, kept) is not None) is refused


@pytest.mark.parametrize(("configured", "available", "loading", "limit"), [
    (100 * MB, 1 << 30, 0, 100 * MB),  # --max-inflight-bytes: the same, whatever loads
    (100 * MB, 1 << 30, 900 * MB, 100 * MB),
    (0, 400 * MB, 0, 200 * MB),  # by default, half of what is free
    (0, 400 * MB, 300 * MB, 50 * MB),  # half of what the load under way leaves
    (0, 400 * MB, 400 * MB, inflight.MIN_DEFAULT_BYTES),
    (0, None, 100 * MB, None),  # not measured: no bound
])
def test_what_requests_in_flight_may_hold_beside_a_load(configured: int, available: int | None, loading: int,
                                                        limit: int | None) -> None:
    assert inflight.limit(configured, available, loading) == limit


async def test_a_load_leaves_the_memory_requests_in_flight_may_hold(
        control_plane: ControlPlane, make_agent: MakeAgent, large: Large, tmp_path: pathlib.Path) -> None:
    # 200 MB free: the 48 MB model's load (about 3 x 48 MB) fits alone, not beside the 100 MB
    # --max-inflight-bytes promises requests: both at once would pass what the box holds.
    agent = await make_agent(control_plane, probe=contained(tmp_path, 1 << 30, (1 << 30) - 200 * MB),
                             model_retry=FAST_RETRY, max_inflight_bytes=100 * MB)
    control_plane.hub.set_assignments(SITE, [assignment(large.a_url, large.a, name="large")], version=1)
    refused = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.FAILED, name="large")
    assert (f"needs about {3 * large.size / MB:.1f} MB of memory to load (3 x its {large.size / MB:.1f} MB file), and "
            "200.0 MB are available to this agent, 100.0 MB of them for requests in flight (--max-inflight-bytes)"
            in refused.message)
    assert agent.registry.get("large") is None


async def test_by_default_requests_in_flight_hold_less_while_a_model_loads(
        control_plane: ControlPlane, make_agent: MakeAgent, large: Large, tmp_path: pathlib.Path) -> None:
    # 200 MB free, and by default requests may hold half of it; while the 48 MB model loads
    # (about 3 x 48 MB), they may hold half of what the load leaves, and then half of what
    # is free again.
    seen: list[int | None] = []
    agents: list[daemon.Agent] = []

    def load(data: bytes) -> onnx.OnnxModel:
        seen.append(agents[0].budget.limit)
        return onnx.OnnxModel.load(data)

    agent = await make_agent(control_plane, probe=contained(tmp_path, 1 << 30, (1 << 30) - 200 * MB), load_model=load)
    agents.append(agent)
    assert agent.budget.limit == 100 * MB
    control_plane.hub.set_assignments(SITE, [assignment(large.a_url, large.a, name="large")], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY, name="large")
    assert seen == [inflight.default_limit(200 * MB - footprint.onnx_need(large.size).bytes)]
    assert agent.budget.limit == 100 * MB


class HeldLoad:
    """A loader whose load of ``held`` (a model's sha256) waits on its thread until the test
    lets it go, as a large model's load would go on for seconds; any other loads at once."""

    def __init__(self, held: str) -> None:
        self.held = held
        self.started, self.go_on, self.ended = threading.Event(), threading.Event(), threading.Event()
        self.others_saw_it_ended: list[bool] = []

    def __call__(self, data: bytes) -> onnx.OnnxModel:
        if hashlib.sha256(data).hexdigest() != self.held:
            self.others_saw_it_ended.append(self.ended.is_set())
            return onnx.OnnxModel.load(data)
        self.started.set()
        try:
            self.go_on.wait(60)  # a hang guard: the test lets it go
            return onnx.OnnxModel.load(data)
        finally:
            self.ended.set()


async def test_a_load_cut_short_keeps_its_turn_and_the_lowered_budget_until_its_thread_ends(
        control_plane: ControlPlane, make_agent: MakeAgent, large: Large, tmp_path: pathlib.Path) -> None:
    # A model unassigned while it loads: its attempt is cancelled, but its thread goes on
    # loading it, the memory taken until it ends. Until then requests may not take the
    # budget back, and the next model's load is not weighed beside it.
    load = HeldLoad(large.a.sha256)
    agent = await make_agent(control_plane, probe=contained(tmp_path, 1 << 30, (1 << 30) - 200 * MB), load_model=load)
    control_plane.hub.set_assignments(SITE, [assignment(large.a_url, large.a, name="large-a")], version=1)
    assert await asyncio.to_thread(load.started.wait, 60)
    lowered = inflight.default_limit(200 * MB - footprint.onnx_need(large.size).bytes)
    assert agent.budget.limit == lowered

    try:
        control_plane.hub.set_assignments(SITE, [assignment(large.b_url, large.b, name="large-b")], version=2)
        await control_plane.events.wait_for(lambda e: e.kind is model.AgentEventKind.MODELS_CHANGED
                                            and "large-b" in e.status.models and "large-a" not in e.status.models)
        assert agent.budget.limit == lowered, "the budget was given back while the load cut short still ran"
        assert load.others_saw_it_ended == []
    finally:
        load.go_on.set()
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY, name="large-b")
    assert load.others_saw_it_ended == [True]
    assert agent.budget.limit == 100 * MB


async def test_a_stopping_agent_does_not_wait_for_a_load_it_cut_short(
        control_plane: ControlPlane, make_agent: MakeAgent, large: Large, tmp_path: pathlib.Path) -> None:
    load = HeldLoad(large.a.sha256)
    agent = await make_agent(control_plane, probe=contained(tmp_path, 1 << 30, (1 << 30) - 200 * MB), load_model=load)
    control_plane.hub.set_assignments(SITE, [assignment(large.a_url, large.a, name="large-a")], version=1)
    assert await asyncio.to_thread(load.started.wait, 60)
    try:
        await asyncio.wait_for(agent.stop(), 30)  # a hang guard: it stops while the load still runs
        assert not load.ended.is_set()
    finally:
        load.go_on.set()
    assert await asyncio.to_thread(load.ended.wait, 60)


async def test_a_new_version_that_fails_where_it_replaced_the_old_one_hands_the_model_back_to_the_old_one(
        control_plane: ControlPlane, make_agent: MakeAgent, large: Large) -> None:
    # Room for one version's load and not beside the other (replaceWhenFull unloads the old
    # one first); the new file does not take what its variant declares, so its load fails
    # once the old version is gone. The old one is loaded again and serves, and the new one
    # is not loaded in its place again at its retries: the model does not serve nothing for good.
    probe = Serving(7 * large.size // 2 + inflight.MIN_DEFAULT_BYTES, large.size)
    agent = await make_agent(control_plane, probe=probe, model_retry=FAST_RETRY)
    probe.registry = agent.registry
    old = dataclasses.replace(assignment(large.a_url, large.a, name="large"), replace_when_full=True)
    control_plane.hub.set_assignments(SITE, [old], version=1)
    await wait_model(control_plane, lambda s: s.serving_sha256 == large.a.sha256, name="large")

    new = dataclasses.replace(assignment(large.b_url, large.b, name="large"), replace_when_full=True,
                              inputs=(model.DeclaredTensor("input", "FP32", (-1, 5)),))
    control_plane.hub.set_assignments(SITE, [new], version=2)
    first = await wait_model(control_plane, lambda s: s.failures == 1, name="large")
    assert "input 'input' is declared FP32 [-1, 5], but the file takes FP32 [-1, 1024]" in first.message, first
    assert first.serving_sha256 == large.a.sha256, first
    assert f"the version it replaced was loaded again; still serving sha256 {large.a.sha256[:12]}" in first.message, first
    assert first.replaced_sha256 == "", first  # said, and none kept aside any more: it serves again
    again = await wait_model(control_plane, lambda s: s.failures == 3, name="large")
    assert again.serving_sha256 == large.a.sha256, again
    assert "not loaded in place of the version serving again" in again.message, again
    assert "input 'input' is declared FP32 [-1, 5]" in again.message, again
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        answer = await client.post("/v2/models/large/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 1024], "data": [0.5] * 1024}]})
        assert answer.status_code == 200, answer.text
