"""Fixtures shared by the whole test suite.

``ray_cluster`` is one real local Ray head per pytest session, started the first time a
test asks for it (tests that never ask pay nothing) and stopped at the end of the session.
It runs on loopback with its own temp dir, free ports and its own auth token, so it cannot
collide with another Ray cluster on the machine. Tests using it are marked ``ray``
automatically (deselect with ``-m "not ray"``).

Sharing rules for tests that deploy to it: name applications uniquely per test, and use
the ``serve_actuator`` fixture (or ``apply([])`` at the end) so no edgeplane application
outlives the test that created it.
"""

from __future__ import annotations

import os
import pathlib
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from orchestrator.adapters import local_ray, ray_serve
from orchestrator.testing import genai_model
from orchestrator.testing import postgres as postgres_server
from orchestrator.testing import ray_cluster as ray_cluster_harness

# Before a test module imports onnxruntime itself: its telemetry stays off in the suite, as
# in every process edgeplane runs it (docs/security.md).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Every process a test starts (`edgeplane serve`, `edgeplane-agent`, Ray workers) imports this
# checkout's code, as the test process does, even when the virtual environment holds an
# editable install of another checkout of the project: an installed console script otherwise
# imports from wherever edgeplane was installed, and the test would drive code it did not read.
_CHECKOUT = str(pathlib.Path(__file__).resolve().parents[1])
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _CHECKOUT:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_CHECKOUT, os.environ.get("PYTHONPATH", "")]))

# A suite started in the background of a shell without job control (`nohup make test &` in a
# script) starts with SIGINT ignored, and every process it starts inherits that: a test that
# stops a CLI with SIGINT, as a user's Ctrl-C does, would wait for it forever.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def postgres() -> Iterator[postgres_server.PostgresServer]:
    """One PostgreSQL server for the session (tests take a fresh database each)."""
    with postgres_server.running() as server:
        if isinstance(server, str):
            pytest.skip(server)
        yield server


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[local_ray.LocalRayEndpoints]:
    """The session's local Ray cluster: ``dashboard_url``, ``serve_url``, ``token()``..."""
    with ray_cluster_harness.shared_ray_cluster() as endpoints:
        yield endpoints


@pytest.fixture(scope="session")
def genai_package(tmp_path_factory: pytest.TempPathFactory) -> genai_model.GenAIModel:
    """The tiny generative model (``runtime: onnx-genai``), built once per session, packed and read-only by convention."""
    return genai_model.build_package(tmp_path_factory.mktemp("genai"), name="tiny-chat")


@pytest.fixture
async def serve_actuator(
    ray_cluster: local_ray.LocalRayEndpoints,
) -> AsyncIterator[ray_serve.RayServeActuator]:
    """A Serve REST actuator on the shared cluster; removes edgeplane's apps afterwards."""
    actuator = ray_cluster.actuator()
    try:
        yield actuator
    finally:
        await actuator.apply([])
        await actuator.close()


# Under pytest-xdist (`make test` runs two workers) tests are scheduled by module: a
# module's tests share its module-scoped fleets and run in their written order (some follow
# what the one before did). Every module with Ray tests is one unit, so one worker runs
# them all and a session starts one shared cluster, as it does without xdist. The
# controller does not collect tests, so it finds those modules by their text; collection
# checks that each test marked ``ray`` is in one of them.
RAY_WORDS = ("ray_cluster", "serve_actuator", "mark.ray")


def ray_modules(root: pathlib.Path) -> frozenset[str]:
    return frozenset(p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")
                     if any(word in p.read_text() for word in RAY_WORDS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    modules = ray_modules(config.rootpath)
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray") is not None and item.nodeid.split("::")[0] not in modules:
            raise pytest.UsageError(f"{item.nodeid} is marked ray but its module does not say {' or '.join(RAY_WORDS)}: "
                                    "pytest-xdist would run it away from the shared cluster")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    modules = ray_modules(config.rootpath)

    class ByModuleRayTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if module in modules else module

    return ByModuleRayTogether(config, log)
