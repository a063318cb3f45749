"""Draining an edge site of a real fleet (a control plane in-process, three ``edgeplane-agent``
processes on loopback) while callers send requests through the gateway: no request fails,
the replica moves to the other French site before it leaves, and the site serves nothing
at the end. A replica whose residency allows no other site stays, and ``drain --wait``
gives up at its timeout saying which and why."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
from typing import Any

import httpx
import numpy as np

from orchestrator.testing import harness, manifests, onnx_models

REPO = pathlib.Path(__file__).resolve().parents[2]
EDGEPLANE = (sys.executable, "-m", "orchestrator.cli.main")  # this checkout's command line
FR_SITES = {"edge-a": 48.0, "edge-b": 49.0}


def _fleet_yaml(model: onnx_models.BuiltModel) -> str:
    return manifests.bundle(
        *(manifests.edge_site(name, "FR", lat, 2.35, region="fr") for name, lat in FR_SITES.items()),
        manifests.edge_site("edge-de", "DE", 52.5, 13.4, region="de"),
        manifests.onnx_model("intent", model.path.name, model.sha256),
        manifests.onnx_model("intent-de", model.path.name, model.sha256),
        manifests.deployment("intent-fr", "intent", 1, {"residency": ["FR"], "tiers": ["edge"]}),
        manifests.deployment("intent-de", "intent-de", 1, {"residency": ["DE"], "tiers": ["edge"]}),
    )


async def _cli(url: str, token: str | None, *args: str) -> tuple[int, str, str]:
    env = {"EDGEPLANE_SERVER": url, **({"EDGEPLANE_TOKEN": token} if token else {})}
    proc = await asyncio.create_subprocess_exec(*EDGEPLANE, *args, env={**_env(), **env}, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _env() -> dict[str, str]:
    import os
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEPLANE_")}


async def test_draining_a_site_under_load_fails_no_request(tmp_path: pathlib.Path) -> None:
    model = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    agents = {**{name: dict(country="FR", region="fr", lat=lat, lon=2.35) for name, lat in FR_SITES.items()},
              "edge-de": dict(country="DE", region="de", lat=52.5, lon=13.4)}

    def ready(cp: Any) -> bool:
        return (any(e.healthy for e in cp.table.endpoints("intent")) and any(e.healthy for e in cp.table.endpoints("intent-de")))

    async with harness.serving_fleet(tmp_path, _fleet_yaml(model), agents, artifact_roots=(model.path.parent,),
                                     ready=ready, timeout=90, what="both replicas") as fleet:
        cp = fleet.cp
        assert cp is not None
        (source,) = [e.site for e in cp.table.endpoints("intent") if e.healthy]
        (other,) = set(FR_SITES) - {source}
        body = {"inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [1, model.in_dim],
                            "data": np.ones(model.in_dim, np.float32).tolist()}]}
        lat = FR_SITES[source]
        headers = {"x-edgeplane-location": f"{lat},2.35", "x-edgeplane-residency": "FR"}
        failures: list[str] = []
        served: dict[str, int] = {}
        stop = asyncio.Event()

        async def caller(http: httpx.AsyncClient) -> None:
            while not stop.is_set():
                try:
                    r = await http.post("/v2/models/intent/infer", json=body, headers=headers)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                site = r.headers.get("x-edgeplane-site", "?")
                served[site] = served.get(site, 0) + 1

        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            callers = [asyncio.create_task(caller(http)) for _ in range(3)]
            await harness.wait_until(lambda: served.get(source, 0) >= 20, 30, what="requests answered before the drain")
            code, out, err = await _cli(cp.http_url, cp.admin_token, "drain", "site", source, "--wait", "--timeout", "90s",
                                        "--reason", "disk swap")
            before_end = dict(served)
            await harness.wait_until(lambda: served.get(other, 0) >= before_end.get(other, 0) + 20, 30,
                                     what="requests answered after the drain")
            stop.set()
            await asyncio.gather(*callers)
        assert code == 0, (out, err)
        # stdout is the answer, progress is on stderr (as apply --wait)
        assert out.splitlines() == [f"site {source} draining"] and err.splitlines()[-1] == f"site {source}: Drained", (out, err)
        assert failures == [], failures[:5]
        assert served.get(other, 0) > 0 and served.get(source, 0) > 0, served
        # the site serves nothing: no placement, no endpoint, and its agent unloaded the model
        assert not [r for r in cp.store.placements() if r.site == source]
        assert source not in {e.site for e in cp.table.endpoints("intent")}
        status = cp.hub.status(source)
        assert status is not None and not [m for m in status.models.values() if m.serving]
        events = [(e.action, e.details.get("site")) for e in cp.store.events(limit=1000) if e.name in ("intent-fr", source)]
        placed, removed = events.index(("replica-placed", other)), events.index(("replica-removed", source))
        assert events.index(("site-drained", None)) < placed < removed, events  # make before break, in the log too

        # residency allows intent-de nowhere else: it stays, and --wait says so when it gives up
        code, out, err = await _cli(cp.http_url, cp.admin_token, "drain", "site", "edge-de", "--wait", "--timeout", "3s", "-o", "json")
        assert code == 1, (out, err)
        result = json.loads(out)
        assert result["drained"] is False and result["maintenance"]["state"] == "Draining", result
        (stuck,) = result["maintenance"]["stuck"]
        assert stuck["deployment"] == "intent-de" and stuck["replicas"] == 1 and "DE" in stuck["reason"], stuck
        assert "not drained within 3 s" in err and "intent-de stays" in err, err
        assert any(e.healthy for e in cp.table.endpoints("intent-de"))  # still serving
        for site in (source, "edge-de"):
            code, out, err = await _cli(cp.http_url, cp.admin_token, "uncordon", "site", site)
            assert code == 0 and out.strip() == f"site {site} uncordoned", (out, err)


async def test_drain_wait_follows_the_drain_through_a_control_plane_restart(tmp_path: pathlib.Path) -> None:
    """The control plane is restarted (upgraded, say) while ``drain --wait`` follows: it says
    so once, asks again, and exits 0 once the site is drained. The drain is kept pending
    until then by a fleet hold (a stored object this version cannot read), lifted after the
    restart."""
    from orchestrator.reconciler import hold
    from orchestrator.store import sqlite as store_mod

    fleet = harness.Fleet(tmp_path)
    proc = None
    try:
        cp = await fleet.start_control_plane()
        port = int(cp.http_url.rsplit(":", 1)[1])
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=manifests.edge_site("edge-x", "FR", 48.0, 2.35))).status_code == 200
        cp.store.apply([store_mod.ObjectWrite("SiteMaintenance", "edge-y", {}, {"mode": "evacuate"})])
        cp.changed("test")
        await harness.wait_until(lambda: (p := cp.store.published(hold.PUBLISHED_KEY)) is not None and p[1], 30, what="the hold")
        proc = await asyncio.create_subprocess_exec(
            *EDGEPLANE, "drain", "site", "edge-x", "--wait", "--timeout", "60s", cwd=REPO,
            env={**_env(), "EDGEPLANE_SERVER": cp.http_url, "EDGEPLANE_TOKEN": cp.admin_token or ""},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None  # progress, as warnings, is on stderr
        lines: list[str] = []
        for _ in range(10):
            lines.append((await asyncio.wait_for(proc.stderr.readline(), 30)).decode().rstrip())
            if lines[-1].startswith("site edge-x: Pending"):
                break
        assert lines[-1].startswith("site edge-x: Pending"), lines
        await fleet.stop()
        # it is told the control plane is away before it comes back
        said = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert said.startswith("warning: control plane unreachable, retrying"), said
        fleet = harness.Fleet(tmp_path)
        cp = await fleet.start_control_plane(port=port)
        cp.store.delete_many([("SiteMaintenance", "edge-y")], store_mod.Event("admin", "delete", "SiteMaintenance", "edge-y", "fixed"))
        cp.changed("hold lifted")
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        lines += err.decode().splitlines()
        assert proc.returncode == 0, (lines, out.decode())
        assert lines[-1] == "site edge-x: Drained" and out.decode().startswith("site edge-x draining\n"), (lines, out.decode())
        assert "unreachable" not in err.decode(), err.decode()  # said once
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await fleet.stop()
