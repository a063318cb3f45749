"""edgeplane plan of a ray-serve Model whose importPath or args change, which makes Ray
Serve roll the application's replicas: each data-centre site that runs it says so. The
control plane in process, its data centre a Ray dashboard's Serve REST API on loopback,
the plan asked through the real API and command line."""

from __future__ import annotations

import asyncio
import pathlib
import re

import httpx
import pytest

from orchestrator.cli import main as cli_main
from orchestrator.testing import harness
from tests.controlplane import datacentres


def fleet(dashboard: datacentres.ServeDashboard, variant: str = '{name: v, runtime: ray-serve, importPath: "pkg.mod:app", '
                                                                   'resources: {cpu: 1, memoryMiB: 256}}') -> str:
    model = datacentres.MODEL.replace('{name: v, runtime: ray-serve, importPath: "pkg.mod:app", resources: {cpu: 1, memoryMiB: 256}}',
                                      variant)
    return datacentres.bundle(datacentres.site("dc-1", on=f"ray: {{address: '{dashboard.url}'}}"), model,
                              datacentres.deployment("d", "dc-1"))


async def test_plan_shows_an_import_path_or_args_change_as_an_update_on_each_data_centre(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    dashboard = datacentres.ServeDashboard()
    f = harness.Fleet(tmp_path)
    try:
        cp = await f.start_control_plane(resync_s=0.2)
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=fleet(dashboard))).status_code == 200
            await harness.wait_until(lambda: [r.site for r in cp.store.placements()] == ["dc-1"], 30, what="placed on dc-1")
            changed = fleet(dashboard, '{name: v, runtime: ray-serve, importPath: "pkg.mod2:app", args: {k: 2}, '
                                       'resources: {cpu: 1, memoryMiB: 256}}')
            resp = await http.post("/v1/apply", params={"dryRun": "true"}, content=changed)
            assert resp.status_code == 200, resp.text
        rows = [(c["site"], c["change"], c.get("updated")) for c in resp.json()["plan"]["changes"]]
        assert rows == [("dc-1", "updated", ["importPath", "args"])], rows
        manifest = tmp_path / "changed.yaml"
        manifest.write_text(changed)
        code = await asyncio.to_thread(cli_main.main, ["--server", cp.http_url, "plan", "-f", str(manifest)])
        printed = capsys.readouterr().out
        assert code == 0 and "No replica changes" not in printed, printed
        assert re.search(r"dc-1\s.*updated: importPath, args", printed), printed
        # with another replica count too, the site says both, as a version roll does
        manifest.write_text(changed.replace("replicas: {min: 1, max: 1}", "replicas: {min: 2, max: 2}"))
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            resp = await http.post("/v1/apply", params={"dryRun": "true"}, content=manifest.read_text())
        rows = [(c["site"], c["change"], c.get("updated")) for c in resp.json()["plan"]["changes"]]
        assert rows == [("dc-1", "added", ["importPath", "args"])], rows
        code = await asyncio.to_thread(cli_main.main, ["--server", cp.http_url, "plan", "-f", str(manifest)])
        printed = capsys.readouterr().out
        assert re.search(r"dc-1\s.*added, updated: importPath, args", printed), printed
    finally:
        await f.stop()
        dashboard.stop()
