"""A package (an onnx or generative model's tar) takes its room once on an edge disk: the
agent keeps the folder it unpacked and drops the tar, and an agent that restarts, after a
``kill -9`` at any point and without its uplink, serves from a whole folder with no download,
and never from one an unpack did not finish."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import httpx
import numpy as np
import openai
import pytest

from edge_agent import registry
from edgeplane_proto import oip
from orchestrator.agents import model
from orchestrator.testing import harness, onnx_models

from . import genai_serving
from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent, start_control_plane
from .test_agent import wait_model
from .test_model_memory import contained
from .test_onnx_package import X, packed
from .test_process import AgentProcess, spawn  # noqa: F401 (spawn: the fixture, edgeplane-agent as a process)

MB = 1 << 20
MARK = ".edgeplane-unpacked"


def held(data_dir: pathlib.Path) -> tuple[set[str], set[str]]:
    """(the names in the artifact cache, the names under models/)."""
    cache, models = data_dir / "cache" / "sha256", data_dir / "models"
    return ({p.name for p in cache.iterdir()} if cache.is_dir() else set(),
            {p.name for p in models.iterdir()} if models.is_dir() else set())


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MARK)


async def infer(url: str, name: str = "m") -> np.ndarray:
    body, _ = oip.encode_request({"x": X})
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post(f"/v2/models/{name}/infer", content=body)
    assert response.status_code == 200, response.text
    return oip.decode_response(response.content).outputs[0].array


# -- in the agent's process ------------------------------------------------------------------


async def test_an_agent_keeps_a_package_unpacked_and_its_tar_goes_then_a_restart_without_uplink_serves_it(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer,
        packages: genai_serving.Packages, tmp_path: pathlib.Path) -> None:
    """Both kinds of package, loaded by onnxruntime and onnxruntime-genai; the restarted agent
    finds neither its control plane nor the artifact store (the files are gone from it)."""
    onnx_url, onnx_sha = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "model"), "kept-onnx.tar")
    shutil.copyfile(artifact_server.root / "tiny-chat.tar", artifact_server.root / "kept-chat.tar")
    chat_url, chat_sha = artifact_server.url("kept-chat.tar"), packages.small.sha256
    data_dir = tmp_path / "agent"
    agent = await make_agent(control_plane, data_dir=data_dir)
    control_plane.hub.set_assignments(SITE, [model.Assignment("m", "intent", "small", onnx_url, onnx_sha),
                                             genai_serving.assignment(chat_url, chat_sha)], version=1)
    for name in ("m", genai_serving.MODEL):
        state = await wait_model(control_plane, lambda s: s.phase in (model.ModelPhase.READY, model.ModelPhase.FAILED), name=name)
        assert state.phase is model.ModelPhase.READY, state.message
    assert held(data_dir) == (set(), {onnx_sha, chat_sha})  # no tar beside the folders
    for sha in (onnx_sha, chat_sha):
        assert (data_dir / "models" / sha / MARK).is_file()
    await agent.stop()

    for name in ("kept-onnx.tar", "kept-chat.tar"):
        (artifact_server.root / name).unlink()
    hits = len(artifact_server.hits)
    await control_plane.server.stop(grace=None)
    restarted = await make_agent(control_plane, data_dir=data_dir)
    await harness.wait_until(lambda: restarted.server.ready, 30, what="the saved assignments loaded, or failed")
    assert {s.name: (s.phase, s.message) for s in restarted.registry.statuses()} == {
        "m": (registry.ModelPhase.READY, ""), genai_serving.MODEL: (registry.ModelPhase.READY, "")}
    np.testing.assert_array_equal(await infer(restarted.endpoint_url), onnx_models.run_in_one_file(X))
    async with openai.AsyncOpenAI(base_url=f"{restarted.endpoint_url}/v1", api_key="unused", max_retries=0) as client:
        answer = await client.chat.completions.create(model=genai_serving.MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=4, temperature=0)
    assert answer.choices[0].message.content
    assert len(artifact_server.hits) == hits  # nothing downloaded
    assert held(data_dir) == (set(), {onnx_sha, chat_sha})


async def test_a_generative_package_served_from_its_folder_is_weighed_by_the_folder(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: genai_serving.Packages, tmp_path: pathlib.Path) -> None:
    """The tar is gone: the load's memory is counted from the unpacked folder's weights and
    its genai_config.json's KV cache."""
    data_dir = tmp_path / "agent"
    agent = await make_agent(control_plane, data_dir=data_dir)
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(packages.small_url, packages.small.sha256)], version=1)
    await genai_serving.wait_state(control_plane, lambda s: s.serving_sha256 == packages.small.sha256)
    await agent.stop()
    folder = data_dir / "models" / packages.small.sha256
    assert held(data_dir) == (set(), {packages.small.sha256})

    restarted = await make_agent(control_plane, data_dir=data_dir, probe=contained(tmp_path, 400 * MB, 399 * MB))
    await harness.wait_until(lambda: restarted.server.ready, 30, what="the saved assignment loaded, or failed")
    (status,) = restarted.registry.statuses()
    assert status.phase is registry.ModelPhase.FAILED, status.message
    assert f"(1.25 x its {folder_bytes(folder) / MB:.1f} MB package, and " in status.message, status.message
    assert "MB of KV cache for 4 sequence(s)" in status.message, status.message
    assert held(data_dir) == (set(), {packages.small.sha256})  # refused for memory: the folder is kept for the next try


async def test_a_version_no_longer_assigned_has_its_folder_removed(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path) -> None:
    url, sha = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "model"), "pruned-onnx.tar")
    data_dir = tmp_path / "agent"
    await make_agent(control_plane, data_dir=data_dir)
    control_plane.hub.set_assignments(SITE, [model.Assignment("m", "intent", "small", url, sha)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY, name="m")
    assert held(data_dir) == (set(), {sha})
    control_plane.hub.set_assignments(SITE, [], version=2)
    await harness.wait_until(lambda: held(data_dir) == (set(), set()), 10, what=f"the folder removed, not {held(data_dir)}")


async def served_then_stopped(control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer,
                              tmp_path: pathlib.Path, name: str, data_dir: pathlib.Path) -> str:
    """An onnx package with external data published as ``name``, served by an agent at
    ``data_dir`` as model ``m``, and that agent stopped: the package's sha256."""
    url, sha = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "model"), name)
    agent = await make_agent(control_plane, data_dir=data_dir)
    control_plane.hub.set_assignments(SITE, [model.Assignment("m", "intent", "small", url, sha)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY, name="m")
    await agent.stop()
    return sha


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
async def test_a_folder_whose_weights_were_damaged_after_its_unpack_is_fetched_again_and_serves(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path,
        damage: str) -> None:
    """The mark and the graph survive (a removal by hand cut short, a disk's fault): the first
    load fails, the folder goes, and the retry downloads, verifies and unpacks it again."""
    name = f"damaged-{damage}.tar"
    data_dir = tmp_path / "agent"
    sha = await served_then_stopped(control_plane, make_agent, artifact_server, tmp_path, name, data_dir)
    weights = data_dir / "models" / sha / "model.onnx.data"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()

    hits = artifact_server.attempts(name)
    restarted = await make_agent(control_plane, data_dir=data_dir, model_retry=registry.RetryPolicy(initial=0.05, maximum=0.2))
    (served,) = await harness.wait_until(lambda: restarted.registry.serving(), 30, what="the version served again")
    assert served.sha256 == sha
    np.testing.assert_array_equal(await infer(restarted.endpoint_url), onnx_models.run_in_one_file(X))
    assert artifact_server.attempts(name) == hits + 1
    assert held(data_dir) == (set(), {sha})
    assert folder_bytes(data_dir / "models" / sha) > 100


async def test_a_generative_folder_whose_weights_were_damaged_after_its_unpack_is_fetched_again_and_serves(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer,
        packages: genai_serving.Packages, tmp_path: pathlib.Path) -> None:
    shutil.copyfile(artifact_server.root / "tiny-chat.tar", artifact_server.root / "damaged-chat.tar")
    url, sha = artifact_server.url("damaged-chat.tar"), packages.small.sha256
    data_dir = tmp_path / "agent"
    agent = await make_agent(control_plane, data_dir=data_dir)
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(url, sha)], version=1)
    await genai_serving.wait_state(control_plane, lambda s: s.serving_sha256 == sha)
    await agent.stop()
    weights = data_dir / "models" / sha / "model.onnx"  # its mark and genai_config.json kept
    weights.write_bytes(weights.read_bytes()[:100])

    restarted = await make_agent(control_plane, data_dir=data_dir, model_retry=registry.RetryPolicy(initial=0.05, maximum=0.2))
    (served,) = await harness.wait_until(lambda: restarted.registry.serving(), 30, what="the version served again")
    assert served.sha256 == sha and artifact_server.attempts("damaged-chat.tar") == 2
    assert held(data_dir) == (set(), {sha}) and weights.stat().st_size > 100


@contextlib.contextmanager
def immutable(folder: pathlib.Path) -> Iterator[None]:
    """``folder``'s entries can be neither renamed nor removed (as on a disk remounted
    read-only), even by root: ``chattr +i``, where the file system and the user allow it."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is refused here (not root, or a file system without it)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("damage", ["weights truncated", "mark gone"])
async def test_a_damaged_folder_that_cannot_be_removed_fails_saying_so(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path,
        damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """A models folder whose entries cannot be removed (a disk gone read-only): the model fails
    with a reason naming the folder, not as an unexpected error with a traceback."""
    name = f"stuck-{damage.split()[0]}.tar"
    data_dir = tmp_path / "agent"
    sha = await served_then_stopped(control_plane, make_agent, artifact_server, tmp_path, name, data_dir)
    folder = data_dir / "models" / sha
    if damage == "weights truncated":
        (folder / "model.onnx.data").write_bytes(b"\0" * 100)
    else:
        (folder / MARK).unlink()

    with immutable(data_dir / "models"):
        restarted = await make_agent(control_plane, data_dir=data_dir, model_retry=registry.RetryPolicy(initial=30, maximum=60))
        await harness.wait_until(lambda: [s for s in restarted.registry.statuses() if s.failures], 30, what="the load failed")
        (status,) = restarted.registry.statuses()
        assert "unexpected error" not in status.message, status.message
        assert f"cannot remove {folder}" in status.message and "Operation not permitted" in status.message, status.message
        assert folder.is_dir() and "Traceback" not in caplog.text
        await restarted.stop()


async def test_a_package_that_fails_to_load_after_its_download_is_fetched_again_only_every_other_backed_off_retry(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path) -> None:
    """A package broken as published: its load fails from a fresh unpack (the folder is kept)
    and from the folder reused (removed); the backoff grows across both."""
    folder = onnx_models.save_with_external_data(tmp_path / "model")
    (folder / "model.onnx.data").write_bytes(b"\0" * 10)
    url, sha = packed(artifact_server, folder, "broken-onnx.tar")
    data_dir = tmp_path / "agent"
    agent = await make_agent(control_plane, data_dir=data_dir, model_retry=registry.RetryPolicy(initial=0.5, maximum=60))
    control_plane.hub.set_assignments(SITE, [model.Assignment("m", "intent", "small", url, sha)], version=1)
    first: dict[int, tuple[str, int, bool]] = {}  # failed n times: (its message, downloads, folder there)

    def failed(times: int) -> bool:
        statuses = agent.registry.statuses()
        if not statuses:  # the assignment not come yet
            return False
        status = statuses[0]
        first.setdefault(status.failures, (status.message, artifact_server.attempts("broken-onnx.tar"),
                                           (data_dir / "models" / sha).is_dir()))
        return status.failures >= times

    await harness.wait_until(lambda: failed(3), 30, what="failed 3x")
    fresh, reused, again = ((n, m, "was removed" in m, downloads, there) for n, (m, downloads, there) in sorted(first.items()) if n)
    assert fresh[2:] == (False, 1, True), fresh  # from a fresh unpack: kept
    assert reused[2:] == (True, 1, False), reused  # from the folder reused: removed
    assert "(failed 2x)" in reused[1], reused
    assert again[2:] == (False, 2, True), again  # downloaded again, once, after the backoff
    assert agent.registry.serving() == []


async def test_two_models_of_one_package_assigned_together_both_serve_from_its_one_folder(
        control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer, tmp_path: pathlib.Path) -> None:
    """The second model's attempt fetched the tar before the first's unpack removed it: it
    loads the folder that unpack left, rather than failing on the tar gone."""
    url, sha = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "model"), "shared-onnx.tar")
    data_dir = tmp_path / "agent"
    agent = await make_agent(control_plane, data_dir=data_dir, model_retry=registry.RetryPolicy(initial=30, maximum=60))
    control_plane.hub.set_assignments(SITE, [model.Assignment(name, "intent", "small", url, sha) for name in ("a", "b")],
                                      version=1)
    for name in ("a", "b"):
        state = await wait_model(control_plane, lambda s: s.phase in (model.ModelPhase.READY, model.ModelPhase.FAILED), name=name)
        assert state.phase is model.ModelPhase.READY, state.message
        np.testing.assert_array_equal(await infer(agent.endpoint_url, name), onnx_models.run_in_one_file(X))
    assert artifact_server.attempts("shared-onnx.tar") == 1
    assert held(data_dir) == (set(), {sha})


# -- a real agent process, killed ------------------------------------------------------------


async def wait_ready(url: str, name: str = "m") -> None:
    """Poll across the process boundary (no event to await there); bounded."""
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(400):
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"/v2/models/{name}/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"model {name} never became ready at {url}")


def _as_left_by(point: str, data_dir: pathlib.Path, tar: pathlib.Path, sha: str) -> None:
    """The data dir as a ``kill -9`` at ``point`` leaves it, from the one a served package left."""
    cache, folder = data_dir / "cache" / "sha256", data_dir / "models" / sha
    if point == "between unpack and tar removal":
        shutil.copyfile(tar, cache / sha)
    elif point == "mid-unpack":  # the temporary folder, half written, and the verified tar
        (folder / MARK).unlink()
        (folder / "model.onnx.data").write_bytes((folder / "model.onnx.data").read_bytes()[:100])
        folder.rename(data_dir / "models" / f".{sha[:12]}-k9x0ab")
        shutil.copyfile(tar, cache / sha)
    elif point == "mid-download":
        shutil.rmtree(folder)
        (cache / f"{sha}.partial").write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    elif point == "a folder with no mark":  # torn by a power loss, or an agent's before the mark
        (folder / MARK).unlink()
        (folder / "model.onnx.data").write_bytes(b"")
    elif point == "a folder lost its graph":
        (folder / "model.onnx").unlink()
    elif point == "a whole folder lost its weights":  # mark and graph kept: its load fails, then it heals
        (folder / "model.onnx.data").unlink()
    elif point == "a whole folder with truncated weights":
        (folder / "model.onnx.data").write_bytes((folder / "model.onnx.data").read_bytes()[:100])


@pytest.mark.parametrize(("point", "downloads"), [
    ("while serving", False),
    ("between unpack and tar removal", False),
    ("mid-unpack", False),
    ("mid-download", True),
    ("a folder with no mark", True),
    ("a folder lost its graph", True),
    ("a whole folder lost its weights", True),
    ("a whole folder with truncated weights", True),
])
async def test_an_agent_killed_at_any_point_restarts_without_uplink_on_a_whole_folder(
        spawn: Callable[..., Awaitable[AgentProcess]],  # noqa: F811
        artifact_server: ArtifactServer, tmp_path: pathlib.Path, point: str, downloads: bool) -> None:
    name = f"killed-{point.replace(' ', '-')}.tar"
    url, sha = packed(artifact_server, onnx_models.save_with_external_data(tmp_path / "model"), name)
    data_dir = tmp_path / "agent"
    cp = await start_control_plane()
    try:
        agent = await spawn(cp.target, data_dir, site=SITE)
        proc, endpoint = agent.proc, agent.url
        await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED, 30)
        cp.hub.set_assignments(SITE, [model.Assignment("m", "intent", "small", url, sha)], 1)
        await wait_ready(endpoint)
        assert held(data_dir) == (set(), {sha})
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 15)
    finally:
        await cp.server.stop(grace=None)  # the uplink lost for good
    _as_left_by(point, data_dir, artifact_server.root / name, sha)

    hits = artifact_server.attempts(name)
    agent = await spawn(cp.target, data_dir, site=SITE)
    proc, endpoint = agent.proc, agent.url
    await wait_ready(endpoint)
    np.testing.assert_array_equal(await infer(endpoint), onnx_models.run_in_one_file(X))
    assert (artifact_server.attempts(name) > hits) is downloads
    assert held(data_dir) == (set(), {sha})  # the tar and any leftover gone, the folder whole
    assert (data_dir / "models" / sha / MARK).is_file()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
