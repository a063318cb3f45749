"""A second, private local Ray head starts, answers, and stops without touching the shared one."""

from __future__ import annotations

import httpx

from orchestrator.adapters import local_ray, ray_serve


def test_local_cluster_stops_only_itself(ray_cluster: local_ray.LocalRayEndpoints) -> None:
    cluster = local_ray.LocalRayCluster(num_cpus=1)
    endpoints = cluster.start()
    try:
        assert endpoints.dashboard_url != ray_cluster.dashboard_url
        assert endpoints.token() != ray_cluster.token()
        assert oct(endpoints.token_file.stat().st_mode & 0o777) == "0o600"
        assert cluster.leftover_pids(), "the marker should find the cluster's processes"
        own = httpx.get(
            endpoints.dashboard_url + ray_serve.APPLICATIONS_PATH,
            headers={"Authorization": f"Bearer {endpoints.token()}"},
        )
        assert own.status_code == 200
        # Each cluster only accepts its own token.
        other = httpx.get(
            endpoints.dashboard_url + ray_serve.APPLICATIONS_PATH,
            headers={"Authorization": f"Bearer {ray_cluster.token()}"},
        )
        assert other.status_code == 403
    finally:
        cluster.stop()
    assert not cluster.running
    assert cluster.leftover_pids() == []
    assert not endpoints.temp_dir.exists()
    shared = httpx.get(
        ray_cluster.dashboard_url + ray_serve.APPLICATIONS_PATH,
        headers={"Authorization": f"Bearer {ray_cluster.token()}"},
    )
    assert shared.status_code == 200
    cluster.stop()  # idempotent
