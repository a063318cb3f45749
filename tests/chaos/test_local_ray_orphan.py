"""kill -9 of ``edgeplane serve`` while it owns its embedded Ray (``ray.address: local``): the
control plane restarted on the same data dir finds the cluster it started and stops it, so no
orphaned Ray keeps running next to the new one."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import time

import httpx
import pytest

from orchestrator.adapters import local_ray
from orchestrator.testing import manifests

from .conftest import ServeProcess, wait_for

DC = manifests.doc("Site", "dc-local", {
    "tier": "datacenter",
    "location": {"country": "FR", "region": "eu-west", "lat": 48.85, "lon": 2.35},
    "capacity": {"cpu": 4, "memoryGiB": 8},
    "ray": {"address": "local"},
})


def _pids_of(cluster: str) -> list[int]:
    """Live processes carrying the cluster's marker, found here rather than by the code under test."""
    marker = f"{local_ray.MARKER_ENV}={cluster}".encode()
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0") \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def _cluster_of_child(parent: int) -> str:
    """The marker of the Ray head that process ``parent`` started (its child in /proc)."""
    prefix = f"{local_ray.MARKER_ENV}=".encode()
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            for var in (entry / "environ").read_bytes().split(b"\0"):
                if var.startswith(prefix):
                    return var[len(prefix):].decode()
        except OSError:
            continue
    raise AssertionError(f"no Ray head among the children of {parent}")


@pytest.mark.ray
def test_a_restart_stops_the_ray_a_killed_control_plane_left(tmp_path: pathlib.Path) -> None:
    record_file = tmp_path / "cp" / "local-ray.json"
    cp = ServeProcess(tmp_path, tmp_path)
    old_cluster = ""
    try:
        cp.start()
        assert httpx.post(f"{cp.url}/v1/apply", content=DC.encode(), timeout=30).status_code == 200

        def site_healthy() -> bool:
            site = httpx.get(f"{cp.url}/v1/sites/dc-local", timeout=5).json()
            return site.get("status", {}).get("health") == "Healthy"

        wait_for(site_healthy, 180, "the embedded Ray to start and its site to be healthy", interval=0.5)
        assert cp.proc is not None
        old_cluster = _cluster_of_child(cp.proc.pid)
        assert _pids_of(old_cluster)

        cp.kill9()
        time.sleep(1.0)  # the orphan is there: nothing stops it on its own
        orphans = _pids_of(old_cluster)
        assert orphans, "the killed control plane's Ray should still run until a restart finds it"

        cp.start(timeout=60)
        restarted = time.monotonic()
        while _pids_of(old_cluster) and time.monotonic() - restarted < 30:
            time.sleep(0.2)
        survivors = _pids_of(old_cluster)
        assert survivors == [], f"processes of the killed control plane's Ray survive 30 s after the restart: {survivors}"
        # the restarted control plane runs its own cluster for the site, recorded in the same place
        wait_for(site_healthy, 180, "the restarted control plane's own Ray", interval=0.5)
        assert json.loads(record_file.read_text())["clusterId"] != old_cluster
    finally:
        cp.stop(timeout=90)  # SIGTERM: stops its own Ray (slow on a loaded machine; a kill would leave the record)
        if old_cluster:  # whatever happened above, leave no process behind
            for pid in _pids_of(old_cluster):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not record_file.exists(), "a clean stop removes the record"
