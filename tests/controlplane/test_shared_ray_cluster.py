"""Two data-centre Sites on one Ray cluster (the demo's dc-paris and dc-frankfurt on the
embedded one), applied at once. Serve's REST API replaces the whole config at each PUT, so
each site's apply reads it, keeps the applications it does not own and writes them back;
since each call to a data centre runs as a task of its own, two sites' applies interleaved,
the later PUT writing back the other site's applications as they were before the earlier
one, and the next observation of that site reported them "configured otherwise" by another
writer and applied them again. The dashboard is a real HTTP server on loopback that holds
the PUTs the test stalls until it releases them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from orchestrator.adapters import serve_config
from orchestrator.manifests import schema
from orchestrator.reconciler import datacentres as dc_mod
from orchestrator.reconciler import applications
from orchestrator.testing import harness
from tests.controlplane import datacentres


def app(site: str, replicas: int) -> serve_config.ServeAppSpec:
    return serve_config.ServeAppSpec(name=applications.app_name(site, "d", "v"), route_prefix=f"/ep/{site}/d/v", model_name="m",
                                     runtime="ray-serve", num_replicas=replicas, import_path="pkg.mod:app")


def spec(url: str) -> schema.SiteSpec:
    return schema.SiteSpec.model_validate({"tier": "datacenter", "location": {"country": "FR", "region": "eu-west", "lat": 48.85, "lon": 2.35},
                                           "capacity": {"cpu": 64, "memoryGiB": 256}, "ray": {"address": url}})


@pytest.fixture
async def dashboard() -> AsyncIterator[datacentres.ServeDashboard]:
    served = datacentres.ServeDashboard()
    try:
        yield served
    finally:
        served.stop()


async def test_two_sites_applied_at_once_on_one_cluster_keep_each_others_applications(
        dashboard: datacentres.ServeDashboard, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="orchestrator.adapters.ray_serve")
    dcs = dc_mod.DataCentres(dc_mod.LocalRay())
    try:
        paris = await dcs.actuator("dc-paris", spec(dashboard.url))
        frankfurt = await dcs.actuator("dc-frankfurt", spec(dashboard.url))
        await paris.apply([app("dc-paris", 1)])
        await frankfurt.apply([app("dc-frankfurt", 1)])

        dashboard.stall("PUT")  # the demo's stop: both sites given more replicas in one pass
        first = asyncio.create_task(frankfurt.apply([app("dc-frankfurt", 3)]))
        await harness.wait_until(lambda: dashboard.held == ["PUT"], 30, what="dc-frankfurt's PUT held")
        second = asyncio.create_task(paris.apply([app("dc-paris", 2)]))
        # dc-paris read the config and sent its PUT beside dc-frankfurt's, or waits for its turn
        await harness.wait_until(lambda: dashboard.held == ["PUT", "PUT"] or any("waits for" in r.getMessage() for r in caplog.records),
                                 30, what="dc-paris's apply begun")
        dashboard.release()
        await asyncio.gather(first, second)

        for actuator, site, replicas in ((paris, "dc-paris", 2), (frankfurt, "dc-frankfurt", 3)):
            statuses = await actuator.observe()
            assert actuator.drift == "", site
            assert statuses[app(site, replicas).name].replicas_target == replicas
    finally:
        dashboard.release()
        await dcs.close()
