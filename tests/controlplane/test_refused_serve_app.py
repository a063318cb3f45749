"""One Serve application Ray refuses holds up no other on its cluster. Serve's REST ``PUT``
is declarative for every application at once: Ray answered 400 to the whole config for one
bad application, and every other stayed unapplied with it, the site's deployments all
failing with one message. Now the refused one alone is left out (or kept as it runs), its
status saying what Ray said, and the others are applied. The dashboard is a real HTTP
server on loopback that checks each config with Ray Serve's own schema, as Ray's does."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from orchestrator.adapters import ray_serve, serve_config
from tests.controlplane import datacentres

pytest.importorskip("ray.serve.schema")


def app(name: str, import_path: str = "pkg.mod:app") -> serve_config.ServeAppSpec:
    """A ray-serve application; one with an import path Ray refuses (two colons) is made past
    the adapter's own check, which holds Ray's rule: it stands for anything of an
    application that Ray's schema refuses and this adapter does not check (a newer Ray's rule)."""
    spec = serve_config.ServeAppSpec(name=name, route_prefix=f"/{name}", model_name=name, runtime="ray-serve", num_replicas=1,
                                     import_path="pkg.mod:app", deployment="Ingress")
    object.__setattr__(spec, "import_path", import_path)
    return spec


@pytest.fixture
def dashboard() -> Iterator[datacentres.ServeDashboard]:
    dashboard = datacentres.ServeDashboard(validates=True)
    yield dashboard
    dashboard.stop()


async def test_an_application_ray_refuses_is_left_out_and_the_others_applied(dashboard: datacentres.ServeDashboard) -> None:
    async with ray_serve.RayServeActuator(dashboard.url) as actuator:
        not_as_asked = await actuator.apply([app("ep-a"), app("ep-bad", "pkg.mod:app:extra"), app("ep-c")])
        assert sorted(dashboard.applications) == ["ep-a", "ep-c"]
        assert list(not_as_asked) == ["ep-bad"]
        assert not_as_asked["ep-bad"].startswith("refused by Ray Serve: import_path: ") and "may have at most one colon" in not_as_asked["ep-bad"]

        seen = await actuator.observe()
        assert {n: s.status for n, s in seen.items()} == {"ep-a": serve_config.ServeAppState.RUNNING, "ep-bad": serve_config.ServeAppState.DEPLOY_FAILED,
                                                          "ep-c": serve_config.ServeAppState.RUNNING}
        assert "may have at most one colon" in seen["ep-bad"].message and actuator.drift == ""

        assert await actuator.apply([app("ep-a"), app("ep-bad"), app("ep-c")]) == {}  # fixed: applied beside the others
        assert sorted(dashboard.applications) == ["ep-a", "ep-bad", "ep-c"]
        assert (await actuator.observe())["ep-bad"].status is serve_config.ServeAppState.RUNNING


async def test_a_change_ray_refuses_leaves_the_application_as_it_runs(dashboard: datacentres.ServeDashboard) -> None:
    async with ray_serve.RayServeActuator(dashboard.url) as actuator:
        await actuator.apply([app("ep-a"), app("ep-b")])
        changed = dataclasses.replace(app("ep-a"), num_replicas=2)
        not_as_asked = await actuator.apply([changed, app("ep-b", "pkg.mod:app:extra")])
        assert "may have at most one colon" in not_as_asked["ep-b"] and not_as_asked["ep-b"].endswith("; it runs as it was")
        assert dashboard.applications["ep-b"]["import_path"] == "pkg.mod:app"  # not removed: still runs as it was
        assert dashboard.applications["ep-a"]["deployments"][0]["num_replicas"] == 2
        seen = await actuator.observe()
        assert seen["ep-b"].status is serve_config.ServeAppState.RUNNING and "may have at most one colon" in seen["ep-b"].message
        assert actuator.drift == ""


async def test_a_config_refused_for_no_one_application_is_refused_whole(dashboard: datacentres.ServeDashboard) -> None:
    """Two applications on one route prefix: Ray names neither, and nothing is applied."""
    async with ray_serve.RayServeActuator(dashboard.url) as actuator:
        clash = dataclasses.replace(app("ep-b"), route_prefix="/ep-a")
        with pytest.raises(serve_config.ServeConfigRejected, match="duplicate applications for route prefix"):
            await actuator.apply([app("ep-a"), clash])
        assert dashboard.applications == {}
