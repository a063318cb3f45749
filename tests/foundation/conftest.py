"""Fixtures of the foundation suite: an offline copy of the example fleet and a control plane.

One control plane per test module (module scope) keeps the suite fast; tests that need a
pristine store start their own.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from orchestrator import server_config

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
