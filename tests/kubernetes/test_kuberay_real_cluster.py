"""Opt-in: KubeRayActuator against a real cluster (runs only when KUBECONFIG is set).

Needs the KubeRay operator (RayService CRD) installed. Namespace from
``EDGEPLANE_TEST_NAMESPACE`` (default ``default``); the RayService is deleted afterwards.
Only the object's round trip is checked, not that Ray pods start (that needs the image).
"""

from __future__ import annotations

import os
import secrets

import pytest

from orchestrator.adapters import kuberay
from orchestrator.adapters.serve_config import ServeAppSpec

pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="KUBECONFIG is not set"),
]


async def test_rayservice_round_trip_on_a_real_cluster() -> None:
    namespace = os.environ.get("EDGEPLANE_TEST_NAMESPACE", "default")
    site = f"test-{secrets.token_hex(3)}"
    actuator = kuberay.KubeRayActuator(kuberay.api_client_for(), namespace, site)
    spec = ServeAppSpec(
        name="ep-probe", route_prefix="/ep/probe", model_name="probe", runtime="onnx",
        num_replicas=1, cpu=0.5, memory_mib=256,
        artifact_uri="https://models.example/probe.onnx", sha256="c" * 64,
    )  # fmt: skip
    try:
        await actuator.apply([spec])
        statuses = await actuator.observe()
        assert "ep-probe" in statuses
        await actuator.apply([spec.__class__(**{**spec.__dict__, "num_replicas": 2})])
        assert (await actuator.observe())["ep-probe"].replicas_target == 2
    finally:
        await actuator.apply([])
        await actuator.close()
