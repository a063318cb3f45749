"""A data centre out of reach for less time than an agent is given before it is declared lost
keeps its replicas: its cluster most likely serves on (an API server restarting for an
upgrade, a dropped connection), and moving off would build all it runs again elsewhere,
then delete it there once it answers, for a KubeRay site its RayService and the whole Ray
cluster with it. The Kubernetes API is a stateful emulator (kmock) over real HTTP that
answers 503 for the outage."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import kmock
import pytest

from orchestrator.adapters import rayservice
from orchestrator.gateway import wire
from orchestrator.testing import harness
from tests.controlplane.datacentres import (MODEL, ServeDashboard, bundle, deployment, has_rayservice, kuberay_on, site,
                                            site_events, site_status, start)


async def test_a_kubernetes_api_outage_shorter_than_the_loss_time_neither_moves_replicas_nor_deletes_the_rayservice(
        fleet: harness.Fleet, kube: kmock.KubernetesEmulator) -> None:
    cp = await start(fleet, kuberay_on(kube))  # declared lost after 3 heartbeats of 0.5 s
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        applied = await http.post("/v1/apply", content=bundle(site("dc-1"), site("dc-2"), MODEL, deployment("d")))
        assert applied.status_code == 200, applied.text
    await harness.wait_until(lambda: has_rayservice(kube, "dc-1") or has_rayservice(kube, "dc-2"), 30, what="d's RayService")
    home, other = ("dc-1", "dc-2") if has_rayservice(kube, "dc-1") else ("dc-2", "dc-1")
    placed = cp.store.placements()

    # The next two reads of home's RayService fail: an outage through one backoff, answered
    # again by the try its loss time brings.
    reads = kube["get", kmock.path(f"/apis/ray.io/v1/namespaces/ns-{home}/rayservices/{rayservice.rayservice_name(home)}")]
    done = len(list(reads))
    reads[done:done + 2] << 503
    await harness.wait_until(lambda: any(action == "datacentre-recovered" for action, _ in site_events(cp, home)), 30,
                             what=f"{home} observed again after its outage")
    await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)  # and planned, applied and removed from since

    assert any(action == "datacentre-error" and "503" in reason for action, reason in site_events(cp, home)), site_events(cp, home)
    assert cp.store.placements() == placed
    assert has_rayservice(kube, home), f"{home}'s RayService was deleted"
    assert not has_rayservice(kube, other), f"d was placed on {other} too"


class ServeProxy:
    """A Ray Serve HTTP proxy on loopback: it answers every v2 inference under the routes it
    serves, whatever the dashboard beside it does. ``requests``: the paths it answered."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                proxy.requests.append(self.path)
                data = json.dumps({"model_name": "m", "outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def serve_site() -> Iterator[tuple[ServeDashboard, ServeProxy]]:
    dashboard, proxy = ServeDashboard(), ServeProxy()
    yield dashboard, proxy
    proxy.stop()
    with contextlib.suppress(OSError):
        dashboard.stop()


INFER = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}


async def test_a_data_centre_out_of_reach_stays_routed_as_last_observed_until_it_is_declared_lost(
        fleet: harness.Fleet, serve_site: tuple[ServeDashboard, ServeProxy]) -> None:
    """Its dashboard down (the cluster's API, not its Serve proxy): the replicas most likely
    answer on, so the gateway of every replica keeps routing to them as last observed, and
    the placement says the data centre does not answer; once declared lost they leave the table."""
    dashboard, proxy = serve_site
    cp = await fleet.start_control_plane(kube_factory=kuberay_on(kmock.KubernetesEmulator()), resync_s=0.2,
                                         heartbeat_interval_s=0.5, missed_heartbeats=12)  # declared lost after 6 s
    routed = "/ep/dc-1/d/v/v2/models/m/infer"

    def published() -> list[dict[str, Any]]:
        found = cp.store.published(wire.PUBLISHED_KEY)
        return [] if found is None else [e for e in json.loads(found[1])["endpoints"] if e["site"] == "dc-1"]

    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        on = f"ray: {{address: '{dashboard.url}', serveUrl: '{proxy.url}'}}"
        applied = await http.post("/v1/apply", content=bundle(site("dc-1", on=on), MODEL, deployment("d", "dc-1")))
        assert applied.status_code == 200, applied.text
        await harness.wait_until(lambda: bool(published()), 30, what="d's endpoint on dc-1")
        assert (await http.post("/v2/models/m/infer", json=INFER)).status_code == 200

        dashboard.stop()
        await harness.wait_until(lambda: "error" in site_status(cp, "dc-1"), 30, what="dc-1 out of reach")
        await cp.reconciler.wait_for_pass(cp.reconciler.passes + 2)
        assert site_status(cp, "dc-1")["health"] == "Unreachable"
        answered = await http.post("/v2/models/m/infer", json=INFER)
        assert answered.status_code == 200, answered.text
        assert proxy.requests.count(routed) == 2
        assert [e["url"] for e in published()] == [f"{proxy.url}/ep/dc-1/d/v"]
        [placed] = (await http.get("/v1/placements")).json()["items"]
        assert placed["state"] == "Unreachable" and "last observed" in placed["reason"], placed

        await harness.wait_until(lambda: not published(), 30, what="dc-1 declared lost and its endpoints gone")
        assert (await http.post("/v2/models/m/infer", json=INFER)).status_code == 503
