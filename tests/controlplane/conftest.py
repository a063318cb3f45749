"""Fixtures shared by the control-plane tests."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import kmock
import pytest

from orchestrator.testing import harness


@pytest.fixture
async def fleet(tmp_path: pathlib.Path) -> AsyncIterator[harness.Fleet]:
    """An empty ``harness.Fleet`` in ``tmp_path``: the test starts its control plane (and
    agents); whatever it started is stopped afterwards. Modules that start a whole fleet for
    each test define their own ``fleet``."""
    fleet = harness.Fleet(tmp_path)
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture
async def kube() -> AsyncIterator[kmock.KubernetesEmulator]:
    """A stateful Kubernetes API emulator served over real HTTP on loopback."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        yield emulator
