"""A control plane and its agents on an IPv6 address, as a dual-stack or IPv6-only host runs
them: what the control plane says agents dial is an address they take, and they join there.
Skipped where this machine has no ::1."""

from __future__ import annotations

import pathlib

from orchestrator.adapters import ray_serve, serve_config
from orchestrator.testing import harness
from tests.controlplane import datacentres
from tests.ipv6 import needs_ipv6_loopback

pytestmark = needs_ipv6_loopback


async def test_an_agent_joins_at_the_address_a_control_plane_on_ipv6_names(tmp_path: pathlib.Path) -> None:
    """``edgeplane serve --host ::1`` said 'agents ::1:8081' and 'first joins on ::1:8082':
    an agent given that address refused it (an IPv6 address goes in brackets)."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(host="::1")
        assert cp.agent_target.startswith("[::1]:") and (cp.agent_join_target or "").startswith("[::1]:")
        await fleet.start_agent("edge-lyon", country="FR", lat=45.76, lon=4.83)  # given cp.agent_target, with mutual TLS
        status = cp.hub.status("edge-lyon")
        assert status is not None and status.healthy
    finally:
        await fleet.stop()


async def test_a_ray_cluster_reached_over_ipv6_serves_at_a_url_in_brackets() -> None:
    """A Serve application on a Ray cluster whose dashboard is reached at an IPv6 address
    (``dashboardUrl: http://[::1]:8265``) was given the endpoint ``http://::1:8000/ep-a``,
    which is no URL: the gateway could not route to it."""
    dashboard = datacentres.ServeDashboard(host="::1")
    try:
        async with ray_serve.RayServeActuator(dashboard.url) as actuator:
            await actuator.apply([serve_config.ServeAppSpec(name="ep-a", route_prefix="/ep-a", model_name="ep-a", runtime="ray-serve",
                                                            num_replicas=1, import_path="pkg.mod:app", deployment="Ingress")])
            seen = await actuator.observe()
    finally:
        dashboard.stop()
    assert seen["ep-a"].endpoint_url == "http://[::1]:8000/ep-a"
