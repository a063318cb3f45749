"""A data centre that fails, and one the control plane must leave alone for now, through the
whole control plane: an adapter that fails unexpectedly holds up no other site, each outage
is logged with its end, a config the cluster refuses (and only that) fails its deployment,
and changes on hold neither apply nor clear anything. KubeRay sites are RayServices on a
stateful Kubernetes API emulator (kmock) over real HTTP, reached through ``kube_factory``."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Mapping, Sequence

import httpx
import kmock

from orchestrator.adapters import serve_config
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from tests.controlplane.datacentres import MODEL, Cluster, bundle, deployment, has_rayservice, kuberay_on, site, site_status, start
from tests.foundation import support


class Broken:
    """An actuator that fails the way a fault in an adapter would, not as a
    DataCentreError: in observe(), or in apply() only."""

    drift = ""

    def __init__(self, in_observe: bool) -> None:
        self.in_observe = in_observe

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        raise KeyError("name")

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        if self.in_observe:
            raise KeyError("name")
        return {}

    async def close(self) -> None:
        pass


class Outages:
    """An actuator whose cluster can be taken away and brought back."""

    drift = ""

    def __init__(self) -> None:
        self.down = False

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        await self.observe()
        return {}

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        if self.down:
            raise serve_config.DataCentreError("cannot reach the cluster: connection refused")
        return {}

    async def close(self) -> None:
        pass


class Refusing:
    """A cluster that answers but fails each apply with ``error``."""

    drift = ""

    def __init__(self, error: serve_config.DataCentreError) -> None:
        self.error = error

    async def apply(self, apps: Sequence[serve_config.ServeAppSpec]) -> Mapping[str, str]:
        raise self.error

    async def observe(self) -> Mapping[str, serve_config.ServeAppStatus]:
        return {}

    async def close(self) -> None:
        pass


async def test_a_site_whose_adapter_fails_unexpectedly_holds_up_no_other_site(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    cp = await start(fleet, kuberay_on(kube, **{"dc-unobserved": Broken(in_observe=True), "dc-unapplied": Broken(in_observe=False)}))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-unobserved"), site("dc-unapplied"), site("dc-ok"),
                                                               MODEL, deployment("d", "dc-ok")))
        assert applied.status_code == 200, applied.text
    await harness.wait_until(lambda: has_rayservice(kube, "dc-ok"), 30, what="dc-ok's RayService")
    await harness.wait_until(lambda: "observing it failed: KeyError" in site_status(cp, "dc-unobserved").get("error", ""), 30,
                             what="dc-unobserved's status to say why it is not observed")
    await harness.wait_until(lambda: any("applying failed: KeyError" in e.reason for e in cp.store.events(kind="Site", name="dc-unapplied")),
                             30, what="an event saying why dc-unapplied is not applied")


async def test_each_outage_of_a_data_centre_is_logged_with_its_end(fleet: harness.Fleet) -> None:
    """A second outage with the same error as the first was in the site's status but not in
    the event log, and was retried after the first one's longer delay."""
    cluster = Outages()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/apply", content=site("dc-1"))).status_code == 200

    def events() -> list[str]:
        return [e.action for e in cp.store.events(kind="Site", name="dc-1", limit=1000)
                if e.action.startswith("datacentre-")]

    def observed() -> bool:
        status = site_status(cp, "dc-1")
        return bool(status) and "error" not in status

    await harness.wait_until(observed, 20, what="dc-1 observed")
    for outage in (1, 2):
        cluster.down = True
        await harness.wait_until(lambda: "cannot reach the cluster" in site_status(cp, "dc-1").get("error", ""), 20,
                                 what=f"outage {outage} in dc-1's status")
        cluster.down = False
        await harness.wait_until(observed, 20, what=f"dc-1 observed after outage {outage}")
    await harness.wait_until(lambda: len(events()) >= 4, 10, what="both outages in the event log")
    assert events() == ["datacentre-error", "datacentre-recovered"] * 2


async def test_a_data_centre_is_neither_applied_to_nor_cleared_while_changes_are_on_hold(fleet: harness.Fleet, tmp_path: pathlib.Path) -> None:
    """A Model an earlier version stored that this one does not read holds every change: a
    deployment added to the site is not applied, and the Site deleted leaves its applications
    running; deleting that Model ends the hold, and they are removed."""
    cluster = Cluster()
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert (await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1")))).status_code == 200
        await harness.wait_until(lambda: bool(cluster.running), 30, what="dc-1's application")
        running = dict(cluster.running)
        legacy = {"variants": [{"name": "v", "runtime": "ray-serve", "importPath": "pkg.mod:app", "throughputRps": 1e-320,
                                "resources": {"cpu": 1, "memoryMiB": 256}}]}  # a throughput this version refuses even stored
        cp.store.apply([store_mod.ObjectWrite("Model", "old", {}, legacy)], store_mod.Event("earlier-version", "apply", "", "", "apply"))
        cp.reconciler.trigger("test")
        await harness.wait_until(lambda: any(e.action == "unreadable" for e in cp.store.events(kind="Model", name="old")), 20,
                                 what="Model old reported unreadable")
        view = (await http.get("/v1/controlplane")).json()
        assert view["hold"].startswith("changes on hold: Model 'old' cannot be read (variants.0.throughputRps"), view
        assert view["hold"].endswith(": apply it again or delete it")
        manifest = tmp_path / "d2.yaml"
        manifest.write_text(deployment("d2", "dc-1"))
        for command in (("plan", "-f", str(manifest)), ("apply", "-f", str(manifest), "--dry-run"), ("simulate", "--fail-site", "dc-1"),
                        ("status",)):  # each says so
            shown = await asyncio.to_thread(support.cli, *command, server_url=cp.http_url)
            assert shown.returncode == 0, shown.stderr
            assert view["hold"] in shown.stdout.splitlines(), (command, shown.stdout)
        assert (await http.post("/v1/apply", content=deployment("d2", "dc-1"))).status_code == 200  # stored
        await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)
        assert cluster.running == running  # not applied
        assert (await http.delete("/v1/sites/dc-1")).status_code == 200
        await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)
        assert cluster.running == running  # not removed
        assert not any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-1", limit=1000))
        assert cp.store.get("Model", "old").status["phase"] == "Unreadable"  # type: ignore[union-attr]

        assert (await http.delete("/v1/models/old")).status_code == 200
        await harness.wait_until(lambda: any(e.action == "serve-removed" for e in cp.store.events(kind="Site", name="dc-1", limit=1000)),
                                 20, what="dc-1's applications removed once the hold ends")
        assert cluster.running == {}
        assert "hold" not in (await http.get("/v1/controlplane")).json()


async def test_only_an_apply_the_cluster_refuses_makes_its_deployment_failing(fleet: harness.Fleet) -> None:
    """Ray not answering yet is retried and passes on its own: the deployment is Progressing
    while the site's status says why. A config the cluster refuses is the operator's to fix:
    Failing, naming the site."""
    cluster = Refusing(serve_config.RayUnreachable("http://127.0.0.1:8265", "connection refused"))
    cp = await start(fleet, lambda name, spec, ownership: cluster)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), MODEL, deployment("d", "dc-1")))
        assert applied.status_code == 200, applied.text

    def phase() -> tuple[str, str]:
        stored = cp.store.get("ModelDeployment", "d")
        status = stored.status if stored is not None else {}
        return status.get("phase", ""), str(status.get("reason", ""))

    await harness.wait_until(lambda: "unreachable" in site_status(cp, "dc-1").get("error", ""), 30, what="dc-1's apply to fail")
    await harness.wait_until(lambda: phase()[0] == "Progressing", 30, what="d to be Progressing")
    cluster.error = serve_config.ServeConfigRejected("422: bad field")
    await harness.wait_until(lambda: phase()[0] == "Failing", 90, what="d to be Failing")
    assert "dc-1: Ray Serve rejected the config: 422: bad field" in phase()[1], phase()
