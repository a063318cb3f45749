"""A KubeRay site whose kubeconfig gets its credentials from a command (an exec plugin, as
EKS's ``aws eks get-token`` and GKE's ``gke-gcloud-auth-plugin`` do) that answers slowly
holds up only itself, as a slow Kubernetes API does: loading the kubeconfig runs that
command, and run on the control plane's event loop it held the whole control plane (every
pass, heartbeat and API call) until the command answered. The command here is a real
process the test holds until it releases it; the Kubernetes API is the stateful emulator
(kmock) over real HTTP; the edge agent is joined to a real hub.

A command that never answers (one waiting on a browser login, or on a network call that
never ends) is waited on a bounded time: its site is then out of reach, saying which
command has not answered, and tried again on its backoff, which waits on the same run
rather than running the command again. A command that fails, or gives credentials the
cluster refuses (401), has its site load the context again on its backoff, running it again;
one that hangs when the client refreshes a token inside a call has that call waited on a
bounded time, and no other begun beside it while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import AsyncIterator

import kmock
import pytest
import yaml

from orchestrator import catalog
from orchestrator.manifests import loader
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import loop
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness, manifests
from tests.controlplane import datacentres, support

#: An exec credential plugin that says it started (a line a run), then answers once the test
#: writes to its FIFO (20 s at most, so that a control plane it holds still ends), and says it answered.
PLUGIN = """
import json, os, select, sys
folder = sys.argv[1]
with open(os.path.join(folder, "started"), "a") as runs:
    runs.write("run\\n")
fifo = os.open(os.path.join(folder, "release"), os.O_RDONLY | os.O_NONBLOCK)
select.select([fifo], [], [], 20)
open(os.path.join(folder, "answered"), "w").close()
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": {"token": "t"}}))
"""

#: An exec credential plugin whose runs do in turn what ``script.json`` in its folder says
#: (the last again once they are spent): ``token`` answers the token ``t<run>`` (expiring in
#: 2100: the client keeps an expiry once given one, and would refresh a token without); ``fail``
#: exits 1 with no credentials; ``expired`` answers ``t<run>``, expired (a token the client
#: refreshes, running the plugin again, at its next call); ``hold`` answers ``t<run>`` once
#: the test writes to its FIFO (20 s at most). A line a run in ``started``.
SCRIPTED = """
import json, os, select, sys
folder = sys.argv[1]
with open(os.path.join(folder, "started"), "a") as runs:
    runs.write("run\\n")
with open(os.path.join(folder, "started")) as runs:
    run = len(runs.read().splitlines())
with open(os.path.join(folder, "script.json")) as script:
    steps = json.load(script)
step = steps[min(run, len(steps)) - 1]
if step == "fail":
    print("error: the session expired; log in again", file=sys.stderr)
    sys.exit(1)
if step == "hold":
    fifo = os.open(os.path.join(folder, "release"), os.O_RDONLY | os.O_NONBLOCK)
    select.select([fifo], [], [], 20)
    open(os.path.join(folder, "answered"), "w").close()
status = {"token": f"t{run}", "expirationTimestamp": "2000-01-01T00:00:00Z" if step == "expired" else "2100-01-01T00:00:00Z"}
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}))
"""


def kubeconfig(folder: pathlib.Path, server: str, plugin: str = PLUGIN) -> pathlib.Path:
    """A kubeconfig whose context ``slow`` reaches ``server`` with a token ``plugin`` gives."""
    (folder / "plugin.py").write_text(plugin)
    os.mkfifo(folder / "release")
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "slow",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "plugin", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                                                       "args": [str(folder / "plugin.py"), str(folder)]}}}],
        "contexts": [{"name": "slow", "context": {"cluster": "emulator", "user": "plugin"}}],
    }))
    return path


def release(folder: pathlib.Path) -> None:
    """Let the plugin answer (it reads nothing; a writer opening its FIFO is the signal), if a run waits."""
    if not (folder / "answered").exists():
        try:
            with open(os.open(folder / "release", os.O_WRONLY | os.O_NONBLOCK), "w") as fifo:
                fifo.write("go\n")
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no run holds it open: none waits
                raise


def runs(folder: pathlib.Path) -> int:
    """How many times the plugin was run."""
    return len((folder / "started").read_text().splitlines()) if (folder / "started").exists() else 0


@contextlib.asynccontextmanager
async def running(tmp_path: pathlib.Path, kube: kmock.KubernetesEmulator, plugin: str = PLUGIN,
                  **datacentres: float) -> AsyncIterator[tuple[loop.Reconciler, store_mod.Store, pathlib.Path]]:
    """A reconciler whose data centres (built with ``datacentres``) are reached through the
    kubeconfig above (its credentials from ``plugin``), its loop running."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    store = store_mod.Store(tmp_path / "state.db")
    through = dc_mod.DataCentres(dc_mod.LocalRay(), kubeconfig=str(kubeconfig(folder, str(kube.url).rstrip("/"), plugin)), **datacentres)
    _, reconciler = support.reconciler_with_agents(store, ("edge-a",), tmp_path, through)
    reconciler.resync_s = 0.2
    running = asyncio.create_task(reconciler.run())
    try:
        yield reconciler, store, folder
    finally:
        if (folder / "started").exists():
            release(folder)
        reconciler.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await reconciler.datacentres.close()
        store.close()


@pytest.fixture
async def held(tmp_path: pathlib.Path, kube: kmock.KubernetesEmulator) -> AsyncIterator[tuple[loop.Reconciler, store_mod.Store, pathlib.Path]]:
    """A reconciler reaching its data centres through the kubeconfig above, waiting on its command as long as it takes here."""
    async with running(tmp_path, kube) as started:
        yield started


@pytest.fixture
async def held_past_bound(tmp_path: pathlib.Path,
                          kube: kmock.KubernetesEmulator) -> AsyncIterator[tuple[loop.Reconciler, store_mod.Store, pathlib.Path]]:
    """The same, waiting on the command half a second at a time."""
    async with running(tmp_path, kube, credentials_wait_s=0.5) as started:
        yield started


async def test_a_kuberay_site_whose_credentials_command_is_held_is_waited_for_and_holds_up_nothing_else(
        held: tuple[loop.Reconciler, store_mod.Store, pathlib.Path], kube: kmock.KubernetesEmulator, tmp_path: pathlib.Path) -> None:
    reconciler, store, folder = held
    (tmp_path / "m1.onnx").write_bytes(b"m1")
    edge = manifests.bundle(manifests.edge_site("edge-a", "FR", 48.0, 2.35, region="fr"),
                            manifests.onnx_model("m1", "m1.onnx", hashlib.sha256(b"m1").hexdigest()),
                            manifests.deployment("on-m1", "m1", 1, {"tiers": ["edge"]}))
    dc = datacentres.bundle(datacentres.site("dc-1", on="kubernetes: {context: slow, namespace: ns-dc-1}"), datacentres.MODEL,
                            datacentres.deployment("d", "dc-1"))
    catalog.apply_documents(store, loader.load_text(manifests.bundle(edge, dc)), actor="test")
    reconciler.applied("test")

    def sent_to_edge() -> set[str]:
        got = reconciler.hub.assignments("edge-a")
        return set() if got is None else {a.model for a in got.assignments}

    def status(kind: str, name: str) -> dict[str, object]:
        stored = store.get(kind, name)
        return dict(stored.status) if stored is not None else {}

    await harness.wait_until(lambda: (folder / "started").exists(), 30, what="dc-1's credentials asked for")
    await harness.wait_until(lambda: sent_to_edge() == {"m1"}, 30, what="edge-a sent m1")
    assert not (folder / "answered").exists(), "edge-a was sent its set only once dc-1's credentials came"
    await harness.wait_until(lambda: status("Site", "dc-1").get("health") == "Waiting", 30, what="dc-1 Waiting")
    assert "dc-1 waiting for its first answer" in str(status("ModelDeployment", "d").get("reason")), status("ModelDeployment", "d")

    release(folder)
    await harness.wait_until(lambda: datacentres.has_rayservice(kube, "dc-1"), 30, what="dc-1's RayService")
    assert "ep-d.v.dc-1" in kube.objects[datacentres.RES, "ns-dc-1", "edgeplane-dc-1"]["spec"]["serveConfigV2"]
    await harness.wait_until(lambda: status("Site", "dc-1").get("health") == "Healthy", 30, what="dc-1 Healthy")


async def test_a_kuberay_site_whose_credentials_command_does_not_answer_in_time_is_unreachable_saying_so_and_the_command_is_not_run_again(
        held_past_bound: tuple[loop.Reconciler, store_mod.Store, pathlib.Path], kube: kmock.KubernetesEmulator) -> None:
    reconciler, store, folder = held_past_bound
    catalog.apply_documents(store, loader.load_text(datacentres.bundle(
        datacentres.site("dc-1", on="kubernetes: {context: slow, namespace: ns-dc-1}"), datacentres.MODEL,
        datacentres.deployment("d", "dc-1"))), actor="test")
    reconciler.applied("test")

    def site() -> dict[str, object]:
        stored = store.get("Site", "dc-1")
        return dict(stored.status) if stored is not None else {}

    command = pathlib.Path(sys.executable).name
    await harness.wait_until(lambda: site().get("health") == "Unreachable", 30, what="dc-1 Unreachable")
    assert site().get("error") == f"the kubeconfig's credential command ({command}) has not answered in 0.5 s", site()
    # tried again on its backoff: the run still held is waited on again, and the command not run again
    await harness.wait_until(lambda: "still running" in str(site().get("error")), 30, what="dc-1 tried again")
    assert site().get("health") == "Unreachable"
    assert runs(folder) == 1, "the credential command was run again while its first run was held"
    errors = [e.reason for e in store.events(kind="Site", name="dc-1", limit=100) if e.action == "datacentre-error"]
    assert any(command in e and "has not answered in 0.5 s" in e for e in errors), errors

    release(folder)
    await harness.wait_until(lambda: site().get("health") == "Healthy", 30, what="dc-1 Healthy")
    await harness.wait_until(lambda: datacentres.has_rayservice(kube, "dc-1"), 30, what="dc-1's RayService")
    assert runs(folder) == 1, "the credential command was run again once it answered"


def dc_1(store: store_mod.Store, reconciler: loop.Reconciler) -> None:
    """dc-1 declared on context ``slow``, with one deployment."""
    catalog.apply_documents(store, loader.load_text(datacentres.bundle(
        datacentres.site("dc-1", on="kubernetes: {context: slow, namespace: ns-dc-1}"), datacentres.MODEL,
        datacentres.deployment("d", "dc-1"))), actor="test")
    reconciler.applied("test")


@pytest.mark.parametrize("first", ["token", "fail"], ids=["its token refused", "it failed"])
async def test_a_kuberay_site_whose_credentials_are_refused_loads_its_context_again_on_its_backoff_and_recovers(
        tmp_path: pathlib.Path, kube: kmock.KubernetesEmulator, first: str) -> None:
    # the cluster refuses the credentials of the command's first run (a token it refuses, or none: the
    # command failed, and the client went on without), and takes those of a run after it
    kube[lambda request: request.headers.get("Authorization") != "Bearer t2"] << 401
    async with running(tmp_path, kube, SCRIPTED) as (reconciler, store, folder):
        (folder / "script.json").write_text(json.dumps([first, "token"]))
        dc_1(store, reconciler)

        def site() -> dict[str, object]:
            stored = store.get("Site", "dc-1")
            return dict(stored.status) if stored is not None else {}

        await harness.wait_until(lambda: site().get("health") == "Unreachable", 30, what="dc-1 Unreachable")
        assert "answered 401 Unauthorized: its credentials were refused; reloading the kubeconfig context" in str(site().get("error")), site()
        await harness.wait_until(lambda: site().get("health") == "Healthy", 30, what="dc-1 Healthy, its context loaded again")
        await harness.wait_until(lambda: datacentres.has_rayservice(kube, "dc-1"), 30, what="dc-1's RayService")
        assert runs(folder) == 2, "the credential command was not run once again, and only once, on the 401"
        errors = [e.reason for e in store.events(kind="Site", name="dc-1", limit=100) if e.action == "datacentre-error"]
        assert any("401 Unauthorized" in e for e in errors), errors


async def test_a_kuberay_site_whose_token_refresh_hangs_in_a_call_is_unreachable_saying_so_and_is_not_called_again_beside_it(
        tmp_path: pathlib.Path, kube: kmock.KubernetesEmulator) -> None:
    # the first run gives a token already expired: the first call refreshes it, running the command
    # again inside the call, and that run hangs
    async with running(tmp_path, kube, SCRIPTED, kube_call_wait_s=1.0) as (reconciler, store, folder):
        (folder / "script.json").write_text(json.dumps(["expired", "hold", "token"]))
        dc_1(store, reconciler)

        def site() -> dict[str, object]:
            stored = store.get("Site", "dc-1")
            return dict(stored.status) if stored is not None else {}

        await harness.wait_until(lambda: site().get("health") == "Unreachable", 15, what="dc-1 Unreachable, its call past its bound")
        assert "has not ended in 1 s" in str(site().get("error")), site()
        # tried again on its backoff: the call still running is waited on again, and no other begun beside it
        await harness.wait_until(lambda: "still running" in str(site().get("error")), 30, what="dc-1 tried again")
        assert site().get("health") == "Unreachable"
        assert runs(folder) == 2, "a second call was begun beside the one still refreshing its token"

        release(folder)
        await harness.wait_until(lambda: site().get("health") == "Healthy", 30, what="dc-1 Healthy")
        await harness.wait_until(lambda: datacentres.has_rayservice(kube, "dc-1"), 30, what="dc-1's RayService")
        assert runs(folder) == 2


def forbidden(user: str) -> dict[str, object]:
    """The Status a Kubernetes API server answers 403 with when ``user`` may not read dc-1's RayService."""
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": f'rayservices.ray.io "edgeplane-dc-1" is forbidden: User "{user}" cannot get resource '
                       '"rayservices" in API group "ray.io" in the namespace "ns-dc-1"'}


async def test_a_kuberay_site_whose_credentials_command_failed_on_a_cluster_that_lets_anonymous_requests_in_loads_its_context_again(
        tmp_path: pathlib.Path, kube: kmock.KubernetesEmulator) -> None:
    # a cluster that allows anonymous requests takes one with no credentials (the command failed, and the
    # client went on without) as system:anonymous, and forbids it: 403, never 401
    kube[lambda request: "Authorization" not in request.headers] << 403 << forbidden("system:anonymous")
    async with running(tmp_path, kube, SCRIPTED) as (reconciler, store, folder):
        (folder / "script.json").write_text(json.dumps(["fail", "token"]))
        dc_1(store, reconciler)

        def site() -> dict[str, object]:
            stored = store.get("Site", "dc-1")
            return dict(stored.status) if stored is not None else {}

        await harness.wait_until(lambda: site().get("health") == "Unreachable", 30, what="dc-1 Unreachable")
        assert "403 Forbidden to a request it took as anonymous" in str(site().get("error")), site()
        await harness.wait_until(lambda: site().get("health") == "Healthy", 30, what="dc-1 Healthy, its context loaded again")
        await harness.wait_until(lambda: datacentres.has_rayservice(kube, "dc-1"), 30, what="dc-1's RayService")
        assert runs(folder) == 2, "the credential command was not run once again, and only once, on the 403"


async def test_a_kuberay_site_whose_user_lacks_the_rbac_permission_says_so_and_does_not_run_its_credentials_command_again(
        tmp_path: pathlib.Path, kube: kmock.KubernetesEmulator) -> None:
    kube[lambda request: True] << 403 << forbidden("arn:aws:iam::1:role/edgeplane")
    async with running(tmp_path, kube, SCRIPTED) as (reconciler, store, folder):
        (folder / "script.json").write_text(json.dumps(["token"]))
        dc_1(store, reconciler)

        def site() -> dict[str, object]:
            stored = store.get("Site", "dc-1")
            return dict(stored.status) if stored is not None else {}

        await harness.wait_until(lambda: len(list(kube)) >= 3, 30, what="dc-1 tried three times")
        error = str(site().get("error"))
        assert "403 Forbidden: the user its credentials name lacks an RBAC permission" in error, site()
        assert 'User "arn:aws:iam::1:role/edgeplane" cannot get resource "rayservices"' in error, site()
        assert runs(folder) == 1, "the credential command was run again on a 403 that named a user"
