"""Fixtures of the foundation suite: an offline copy of the example fleet and a control plane
(in a thread, or ``edgeplane serve`` as a subprocess for the command line's tests).

One control plane per test module (module scope) keeps the suite fast; tests that need a
pristine store start their own. The state store's tests (``test_store_*.py``) take a
``store`` on each backend in turn: an SQLite file and a database on the session's PostgreSQL.
"""

from __future__ import annotations

import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from orchestrator import server_config
from orchestrator.store import StateStore as Store
from orchestrator.store import open_store

from . import support


@pytest.fixture(scope="session")
def offline_fleet(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """manifests/examples with the data centres' Ray addresses pointing at a closed port."""
    return support.offline_examples(tmp_path_factory.mktemp("fleet") / "examples")


def start_control_plane(data_dir: pathlib.Path, artifact_root: pathlib.Path, **config: object) -> support.ServerThread:
    settings: dict[str, object] = dict(data_dir=data_dir, port=0, agent_port=0, agent_join_port=0, artifact_roots=(artifact_root,), resync_s=5.0)
    cfg = server_config.ServerConfig(**{**settings, **config})  # type: ignore[arg-type]
    return support.ServerThread(cfg).start()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory, offline_fleet: pathlib.Path) -> Iterator[support.ServerThread]:
    """A real control plane (auth off, loopback) shared by the tests of one module."""
    cp = start_control_plane(tmp_path_factory.mktemp("cp"), offline_fleet)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def api(control_plane: support.ServerThread) -> Iterator[httpx.Client]:
    """An HTTP client of the module's control plane."""
    with httpx.Client(base_url=control_plane.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, offline_fleet: pathlib.Path) -> Iterator[support.ServerThread]:
    """A real control plane with token auth (loopback) shared by the tests of one module."""
    cp = start_control_plane(tmp_path_factory.mktemp("secured"), offline_fleet, auth="token")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, offline_fleet: pathlib.Path) -> Iterator[support.ServeProcess]:
    """``edgeplane serve`` as a subprocess (auth off, loopback), shared by the tests of one
    module: the command line's tests run ``edgeplane`` against it. The example fleet's data
    centres stay out of reach, never lost, so that what they read does not change under them."""
    proc = support.ServeProcess(tmp_path_factory.mktemp("cli") / "data", *support.DATA_CENTRES_NEVER_LOST,
                                artifact_root=offline_fleet).wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def applied(serve: support.ServeProcess, offline_fleet: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """The example fleet applied to ``serve`` with ``edgeplane apply -f``."""
    proc = support.cli("apply", "-f", str(offline_fleet), server_url=serve.url)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def clock() -> support.FakeClock:
    return support.FakeClock()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """Where a test's store lives: an SQLite file, or a fresh database on the session's server."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def reopen(location: str) -> Iterator[Callable[..., Store]]:
    """Opens (again) the store at this test's location; closes all it opened at the end."""
    opened: list[Store] = []

    def make(clock: Callable[[], float] = time.time) -> Store:
        opened.append(open_store(location, clock=clock))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(reopen: Callable[..., Store], clock: support.FakeClock) -> Store:
    return reopen(clock)
