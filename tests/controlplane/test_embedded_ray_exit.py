"""The embedded data centre (``ray.address: local``) whose Ray head exits under a running
control plane (killed, or out of memory): the control plane says so on the Site, starts a
new head and gives it the Site's Serve applications again. The head is
``ray_head_standin.py`` run as the ``ray`` command: a child process serving the Serve REST
API, owned and stopped exactly as a real head is."""

from __future__ import annotations

import os
import pathlib
import signal
import sys

import httpx

from orchestrator import server
from orchestrator.adapters import local_ray
from orchestrator.testing import harness
from tests.controlplane.datacentres import MODEL, bundle, deployment, site, site_status

STANDIN = pathlib.Path(__file__).with_name("ray_head_standin.py")


def ray_command(folder: pathlib.Path) -> pathlib.Path:
    command = folder / "ray"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    command.chmod(0o755)
    return command


def held(endpoints: local_ray.LocalRayEndpoints | None) -> set[str]:
    """The applications the head at ``endpoints`` holds (empty while none answers)."""
    if endpoints is None:
        return set()
    try:
        answer = httpx.get(endpoints.dashboard_url + "/api/serve/applications/", timeout=2,
                           headers={"Authorization": f"Bearer {endpoints.token()}"})
    except (httpx.TransportError, OSError):
        return set()
    return set(answer.json()["applications"]) if answer.status_code == 200 else set()


def events(cp: server.ControlPlane, action: str) -> list[str]:
    return [e.reason for e in cp.store.events(kind="Site", name="dc-local", limit=1000) if e.action == action]


async def serving_one_application(fleet: harness.Fleet, tmp_path: pathlib.Path) -> server.ControlPlane:
    """A control plane whose embedded Ray head (the stand-in) serves Site dc-local's one application."""
    cp = await fleet.start_control_plane(local_ray_executable=ray_command(tmp_path), resync_s=0.2)
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-local", "ray: {address: local}"), MODEL,
                                                               deployment("d", "dc-local")))
        assert applied.status_code == 200, applied.text
    local = cp.datacentres.local
    await harness.wait_until(lambda: len(held(local.endpoints)) == 1, 30, what="the application on the embedded Ray")
    return cp


async def test_an_embedded_ray_head_that_exits_is_started_again_with_its_applications(
        fleet: harness.Fleet, tmp_path: pathlib.Path) -> None:
    cp = await serving_one_application(fleet, tmp_path)
    local = cp.datacentres.local
    first = local.endpoints
    assert first is not None
    (app,) = held(first)

    os.kill(int((first.temp_dir / "head.pid").read_text()), signal.SIGKILL)

    await harness.wait_until(lambda: local.endpoints not in (None, first) and held(local.endpoints) == {app}, 30,
                             what="a new embedded Ray head holding the Site's application again")
    await harness.wait_until(lambda: site_status(cp, "dc-local").get("health") == "Healthy", 30, what="the Site healthy again")
    (error,) = [e for e in events(cp, "datacentre-error") if "exited" in e]
    assert "the embedded Ray cluster exited (killed by SIGKILL)" in error, error
    assert events(cp, "datacentre-recovered")


async def test_a_site_deleted_after_its_embedded_ray_head_exited_has_nothing_left_to_remove(
        fleet: harness.Fleet, tmp_path: pathlib.Path) -> None:
    """What ran on a head that exited stopped with it: the deleted Site's removal is done at
    once, not tried against the old head's address for good."""
    cp = await serving_one_application(fleet, tmp_path)
    local = cp.datacentres.local
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        assert local.endpoints is not None
        os.kill(int((local.endpoints.temp_dir / "head.pid").read_text()), signal.SIGKILL)
        await harness.wait_until(lambda: held(local.endpoints) == set(), 30, what="the head to have exited")
        assert (await http.delete("/v1/sites/dc-local")).status_code == 200
    await harness.wait_until(lambda: cp.store.deleted_sites() == [], 30, what="the deleted Site's removal to be done")
    assert local.endpoints is None or held(local.endpoints) == set()
