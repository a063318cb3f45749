"""Failed model loads are retried with backoff until they succeed or the assignment changes.

The artifact server is real HTTP on loopback; it is scripted to answer 503/404 first (an
artifact store briefly down, an artifact published late) or serves bytes whose sha256 does
not match (refused on every attempt, never served). The backoff schedule itself is checked
on the registry with an injected clock, so no test depends on timing.
"""

from __future__ import annotations

import logging
import pathlib
import shutil

import httpx
import numpy as np
import pytest

from edge_agent import artifacts, assignments, heap, registry
from edge_agent.runtime import onnx
from orchestrator.agents import model

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent, Models
from .test_agent import assignment, infer, reference, v1_then_v2, wait_model


class _MaxJitter:
    """The top of the jitter range, so delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _MinJitter:
    def uniform(self, a: float, b: float) -> float:
        return a


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("failures", "top", "bottom"),
    [(1, 1.0, 0.5), (2, 2.0, 1.0), (3, 4.0, 2.0), (6, 32.0, 16.0), (7, 60.0, 30.0), (50, 60.0, 30.0)],
)
def test_retry_delay_doubles_from_1s_to_60s_with_jitter(failures: int, top: float, bottom: float) -> None:
    policy = registry.RetryPolicy()
    assert policy.delay(failures, _MaxJitter()) == top
    assert policy.delay(failures, _MinJitter()) == bottom


def _one(url: str, sha256: str, version: int = 1) -> assignments.AssignmentSet:
    return assignments.AssignmentSet(
        version, (assignments.Assignment("mlp", "intent", "small", url, sha256),)
    )


async def test_registry_backs_off_on_a_mismatching_artifact_and_a_new_assignment_cancels_it(
    tmp_path: pathlib.Path, models: Models, artifact_server: ArtifactServer
) -> None:
    clock = _Clock()
    models_reg = registry.ModelRegistry(
        artifacts.ArtifactCache(tmp_path),
        lambda data: onnx.OnnxModel.load(data),
        retry=registry.RetryPolicy(initial=1.0, maximum=4.0),
        clock=clock,
        rng=_MaxJitter(),
    )
    bad = _one(models.corrupt_url, models.v2.sha256)
    name = "mlp-corrupt.onnx"
    before = artifact_server.attempts(name)
    assert models_reg.retry_due_in() is None
    expected_delays = [1.0, 2.0, 4.0, 4.0]
    for attempt, delay in enumerate(expected_delays, start=1):
        await models_reg.converge(bad)
        assert artifact_server.attempts(name) - before == attempt
        (status,) = models_reg.statuses()
        assert status.phase is registry.ModelPhase.FAILED
        assert f"expected {models.v2.sha256}" in status.message
        assert f"retrying in {delay:.1f}s (failed {attempt}x)" in status.message
        assert models_reg.get("mlp") is None  # refused, never served
        assert models_reg.retry_due_in() == delay
        # Not due yet: the same set converges without touching the network.
        clock.now += delay / 2
        await models_reg.converge(bad)
        assert artifact_server.attempts(name) - before == attempt
        assert models_reg.retry_due_in() == delay / 2
        clock.now += delay / 2
    assert not (tmp_path / "sha256" / models.v2.sha256).exists()

    # A changed assignment is attempted at once, whatever the backoff said.
    await models_reg.converge(_one(models.v2_url, models.v2.sha256, version=2))
    (status,) = models_reg.statuses()
    assert status.phase is registry.ModelPhase.READY and status.message == ""
    assert status.serving_sha256 == models.v2.sha256
    assert models_reg.retry_due_in() is None


async def test_an_unexpected_error_in_one_load_fails_that_model_and_is_retried(
    tmp_path: pathlib.Path, models: Models
) -> None:
    def load(data: bytes) -> onnx.OnnxModel:
        if data == models.v2.path.read_bytes():
            raise RecursionError("maximum recursion depth exceeded")  # not an error the agent raises on purpose
        return onnx.OnnxModel.load(data)

    models_reg = registry.ModelRegistry(artifacts.ArtifactCache(tmp_path), load, rng=_MaxJitter())
    await models_reg.converge(assignments.AssignmentSet(1, (
        assignments.Assignment("broken", "d", "v", models.v2_url, models.v2.sha256),
        assignments.Assignment("mlp", "d", "v", models.v1_url, models.v1.sha256),
    )))
    states = {s.name: s for s in models_reg.statuses()}
    assert states["mlp"].phase is registry.ModelPhase.READY
    assert states["broken"].phase is registry.ModelPhase.FAILED
    assert states["broken"].message == ("unexpected error while loading: RecursionError: maximum recursion depth exceeded; "
                                        "retrying in 1.0s (failed 1x)")
    assert models_reg.retry_due_in() is not None


async def test_artifact_that_is_unavailable_at_first_becomes_ready_without_a_new_assignment(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models, artifact_server: ArtifactServer
) -> None:
    name = "late-mlp.onnx"
    shutil.copyfile(models.v1.path, artifact_server.root / name)
    artifact_server.fail_next(name, 503, 404)  # store down, then not yet published
    agent = await make_agent(
        control_plane, model_retry=registry.RetryPolicy(initial=0.05, maximum=0.2)
    )
    control_plane.hub.set_assignments(
        SITE, [assignment(artifact_server.url(name), models.v1)], version=1
    )
    failed = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.FAILED)
    assert "HTTP 503" in failed.message and "retrying in" in failed.message
    ready = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    assert ready.serving_sha256 == models.v1.sha256
    assert artifact_server.attempts(name) == 3
    assert agent.registry.applied_version == 1  # no new assignment was needed
    assert any(
        e.status.models.get("mlp") is not None and "HTTP 404" in e.status.models["mlp"].message
        for e in control_plane.events.events
        if e.kind is model.AgentEventKind.MODELS_CHANGED
    )
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        x = np.ones((2, 8), np.float32)
        np.testing.assert_allclose(await infer(client, x), reference(models.v1, 0, x), rtol=1e-5)


async def test_mismatching_upgrade_keeps_being_refused_while_the_old_version_serves(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models, artifact_server: ArtifactServer
) -> None:
    agent = await make_agent(
        control_plane, model_retry=registry.RetryPolicy(initial=0.05, maximum=0.2)
    )
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)

    before = artifact_server.attempts("mlp-corrupt.onnx")
    bad = model.Assignment("mlp", "intent", "small", models.corrupt_url, models.v2.sha256)
    control_plane.hub.set_assignments(SITE, [bad], version=2)
    third = await wait_model(
        control_plane,
        lambda s: s.phase is model.ModelPhase.FAILED and "(failed 3x)" in s.message,
    )
    assert artifact_server.attempts("mlp-corrupt.onnx") - before >= 3
    assert "expected " + models.v2.sha256 in third.message
    assert third.serving_sha256 == models.v1.sha256
    assert not (agent.config.data_dir / "cache" / "sha256" / models.v2.sha256).exists()
    async with httpx.AsyncClient(base_url=agent.endpoint_url) as client:
        await v1_then_v2(control_plane, client, models, version=3)  # a corrected assignment replaces the retry loop
    assert agent.registry.retry_due_in() is None


def trim_found_and_run() -> bool:
    """Whether the agent finds glibc's ``malloc_trim``, once its release of freed memory has
    run outside the stand-in. Through the heap's functions, the private one too: the agent runs them
    only inside a converge, and nothing public says whether the trim was found."""
    found = heap._malloc_trim() is not None
    heap.release_freed()
    return found


async def test_freed_memory_is_returned_when_the_serving_set_changes(
    tmp_path: pathlib.Path, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(heap, "release_freed", lambda: trims.append(1))
    models_reg = registry.ModelRegistry(artifacts.ArtifactCache(tmp_path), lambda data: onnx.OnnxModel.load(data))
    await models_reg.converge(_one(models.v1_url, models.v1.sha256))
    assert len(trims) == 1  # loaded
    await models_reg.converge(_one(models.v1_url, models.v1.sha256, version=2))
    assert len(trims) == 1  # nothing changed
    await models_reg.converge(assignments.AssignmentSet(3, ()))
    assert len(trims) == 2  # unloaded
    monkeypatch.undo()
    assert trim_found_and_run()  # glibc, on the machines the tests run on


async def test_a_model_failing_for_an_hour_is_logged_every_ten_minutes_not_at_every_retry(
    tmp_path: pathlib.Path, artifact_server: ArtifactServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An artifact the agent cannot fetch while its uplink is down (the control plane serves
    it) fails at every retry, once a minute at the cap, for as long as the outage lasts: a
    week of it was ten thousand error lines alike."""
    caplog.set_level(logging.INFO, logger="edge_agent.registry")
    clock = _Clock()
    models_reg = registry.ModelRegistry(artifacts.ArtifactCache(tmp_path), lambda data: onnx.OnnxModel.load(data),
                                        retry=registry.RetryPolicy(initial=60.0, maximum=60.0), clock=clock, rng=_MaxJitter())
    gone = _one(artifact_server.url("not-there.onnx"), "0" * 64)
    for _ in range(60):  # an hour of retries
        await models_reg.converge(gone)
        due = models_reg.retry_due_in()
        assert due is not None
        clock.now += due
    await models_reg.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(said) <= 7, said  # the first failure, then one per ten minutes
    assert "failed 11x" in said[1] and "said again every 10 minutes" in said[1], said[1]
