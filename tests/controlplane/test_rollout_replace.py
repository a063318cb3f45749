"""A rollout on a site whose agent cannot hold two versions of its model at once: with
make before break (the default) the new version is refused there and the rollout halts;
with ``strategy: replaceWhenFull`` that agent unloads the old version first and the
rollout completes, the gateway sending the site's callers to the other replica meanwhile.
Real agents over gRPC (one held to a memory limit as a container's cgroup would hold it),
real onnxruntime, callers through the gateway."""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.agents import model as agent_model
from orchestrator.cli import main as cli_main
from orchestrator.testing import harness, manifests, onnx_models

from .test_changes_under_load import Traffic

MB = 1 << 20
SMALL, LARGE = "edge-small", "edge-large"
SITES = {SMALL: dict(country="FR", region="fr", lat=48.85, lon=2.35), LARGE: dict(country="FR", region="fr", lat=45.76, lon=4.83)}


def fleet_yaml(model: onnx_models.BuiltModel, strategy: str | None = None) -> str:
    rollout: dict = {"maxUnavailable": 1}
    if strategy is not None:
        rollout["strategy"] = strategy
    deployment = manifests.doc("ModelDeployment", "intent-fr", {
        "model": "intent", "replicas": {"min": 2, "max": 2},
        "placement": {"residency": ["FR"], "tiers": ["edge"], "spread": {"by": "site", "maxSkew": 1}}, "rollout": rollout})
    return manifests.bundle(*(manifests.edge_site(n, w["country"], w["lat"], w["lon"], region="fr") for n, w in SITES.items()),
                            manifests.onnx_model("intent", model.path.name, model.sha256), deployment)


def build(folder: pathlib.Path, name: str, seed: int) -> onnx_models.BuiltModel:
    """An 80 MB MLP: onnxruntime takes about 3 x that while it loads it, 1 x once loaded."""
    return onnx_models.build_mlp(folder / name, in_dim=1024, hidden=4096, out_dim=16, layers=3, seed=seed)


def agents(size: int) -> dict[str, dict]:
    """The small site's agent has room for one version's load and nothing beside it: about
    3.5 x the model over what it holds once started (a load needs 3 x, and 16 MiB are kept
    for requests in flight), where loading beside a version that keeps 1 x needs 4 x."""
    limit = harness.under_memory_limit(7 * size // 2 + 16 * MB)
    return {SMALL: {**SITES[SMALL], "entry": limit}, LARGE: SITES[LARGE]}


def serving(cp, site: str) -> str:  # noqa: ANN001
    st = cp.hub.status(site)
    m = st.models.get("intent") if st is not None else None
    return m.serving_sha256 if m is not None else ""


def rollout_of(cp) -> dict:  # noqa: ANN001
    obj = cp.store.get("ModelDeployment", "intent-fr")
    return (obj.status or {}).get("rollout", {}) if obj is not None else {}


async def rollout_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """The control plane's ``edgeplane_rollout_*`` gauges of intent-fr, as its ``/metrics`` gives them."""
    text = (await http.get("/metrics")).text
    return {f.name: s.value for f in text_string_to_metric_families(text) if f.name.startswith("edgeplane_rollout_")
            for s in f.samples if s.labels.get("deployment") == "intent-fr"}


async def apply(cp, body: str) -> None:  # noqa: ANN001
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        resp = await http.post("/v1/apply", content=body)
        assert resp.status_code == 200, resp.text


async def test_make_before_break_halts_where_both_versions_do_not_fit(tmp_path: pathlib.Path) -> None:
    art = tmp_path / "artifacts"
    v1, v2 = build(art, "v1.onnx", 1), build(art, "v2.onnx", 2)
    async with harness.serving_fleet(tmp_path, fleet_yaml(v1), agents(v1.path.stat().st_size), artifact_roots=(art,),
                                     ready=lambda cp: all(serving(cp, s) == v1.sha256 for s in SITES), what="v1 on both",
                                     resync_s=0.5) as fleet:
        cp = fleet.cp
        assert cp is not None
        await apply(cp, fleet_yaml(v2))
        rollout = await harness.wait_until(lambda: r if "halted" in (r := rollout_of(cp)) else None, 60, what="the rollout halted")
        assert SMALL in rollout["halted"] and "MB of memory to load" in rollout["halted"], rollout
        assert serving(cp, SMALL) == v1.sha256  # the old version keeps serving there, and stays
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert await rollout_metrics(http) == {"edgeplane_rollout_halted": 1.0, "edgeplane_rollout_replacing_sites": 0.0}


async def test_replace_when_full_completes_the_rollout_and_no_request_fails(tmp_path: pathlib.Path,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:
    art = tmp_path / "artifacts"
    v1, v2 = build(art, "v1.onnx", 1), build(art, "v2.onnx", 2)
    first: list[dict] = []  # the rollout blocks the status showed while v1 first loaded

    def loaded(cp) -> bool:  # noqa: ANN001
        if (r := rollout_of(cp)) and r not in first:
            first.append(r)
        return all(serving(cp, s) == v1.sha256 for s in SITES)

    async with harness.serving_fleet(tmp_path, fleet_yaml(v1, "replaceWhenFull"), agents(v1.path.stat().st_size),
                                     artifact_roots=(art,), ready=loaded, what="v1 on both", resync_s=0.5) as fleet:
        cp = fleet.cp
        assert cp is not None
        # a first load, no older version unloaded anywhere (the agents say so): no rollout,
        # where each loading site was listed as replacing one
        assert first == [], first
        manifest = tmp_path / "v2.yaml"
        manifest.write_text(fleet_yaml(v2, "replaceWhenFull"))
        code = await asyncio.to_thread(cli_main.main, ["--server", cp.http_url, "plan", "-f", str(manifest)])
        printed = capsys.readouterr().out
        assert code == 0, printed
        for site in SITES:
            assert re.search(rf"{site}\s.*new version {v1.sha256[:12]} -> {v2.sha256[:12]} \(replaceWhenFull\)", printed), printed

        replacing: list[list[str]] = []
        scraped: list[dict[str, float]] = []  # the rollout's gauges, each time they changed
        async with Traffic(cp.http_url, v1) as traffic, httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            await apply(cp, fleet_yaml(v2, "replaceWhenFull"))
            for _ in range(6000):  # bounded: ~60 s at 10 ms
                if all(serving(cp, s) == v2.sha256 for s in SITES):
                    break
                if (r := rollout_of(cp).get("replacing")) and r not in replacing:
                    replacing.append(r)
                if (now := await rollout_metrics(http)) and now not in scraped:
                    scraped.append(now)
                await asyncio.sleep(0.01)
            assert all(serving(cp, s) == v2.sha256 for s in SITES), {s: serving(cp, s)[:12] for s in SITES}
            traffic.answered.clear()
            await asyncio.wait_for(traffic.answered.wait(), 30)
        assert traffic.failures == [], traffic.report()
        assert traffic.served.get(LARGE), traffic.report()
        assert replacing == [[SMALL]], replacing  # the status said where the old version was unloaded first
        st = cp.hub.status(SMALL)
        assert st is not None and st.models["intent"].serving_sha256 == v2.sha256
        await harness.wait_until(lambda: not rollout_of(cp), 20, what="the rollout finished in status")
        # the site that served nothing while it replaced its version was one to alert on, and no rollout halted
        assert {"edgeplane_rollout_halted": 0.0, "edgeplane_rollout_replacing_sites": 1.0} in scraped, scraped
        assert all(m["edgeplane_rollout_halted"] == 0.0 for m in scraped), scraped
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
            assert await rollout_metrics(http) == {}  # a finished rollout leaves no series


def held_loads(entry: tuple[str, ...], sha256: str, gate: pathlib.Path) -> tuple[str, ...]:
    """``entry`` (a ``python -c`` script ending in the agent's main) with each load of the
    version ``sha256`` held until the test opens the FIFO ``gate`` to write: a load that takes
    as long as the test needs, as a large model's would."""
    flag, script = entry
    head, main = script.rsplit("sys.exit(main.main())", 1)
    hold = (
        "import hashlib\n"
        "from edge_agent.runtime import onnx as held_onnx\n"
        "held_load = held_onnx.OnnxModel.load\n"
        "def held(data, *args, **kwargs):\n"
        f"    if hashlib.sha256(data).hexdigest() == {sha256!r}:\n"
        f"        open({str(gate)!r}).read()\n"
        "    return held_load(data, *args, **kwargs)\n"
        "held_onnx.OnnxModel.load = held\n"
    )
    return (flag, head + hold + "sys.exit(main.main())" + main)


def release(gate: pathlib.Path) -> int | None:
    """Open ``gate`` to write once a held load waits on it (None: none does yet)."""
    try:
        return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


@pytest.mark.parametrize("new_version", ["loads", "fails"])
async def test_an_agent_killed_mid_replacement_still_reports_it_and_loads_the_old_version_again(
        tmp_path: pathlib.Path, new_version: str) -> None:
    """The agent unloaded v1 for v2 (replaceWhenFull) and is killed -9 while v2 loads. Started
    again, it says it replaced v1, so the control plane shows the site replacing, not loading a
    first version; and when v2 then fails (its file does not take what its variant declares),
    v1 is loaded again from the cache and serves."""
    art = tmp_path / "artifacts"
    v1, v2 = build(art, "v1.onnx", 1), build(art, "v2.onnx", 2)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    declared = [{"name": "input", "datatype": "FP32", "shape": [-1, 5]}] if new_version == "fails" else None

    def one_site(built: onnx_models.BuiltModel, inputs: list[dict] | None = None) -> str:
        deployment = manifests.doc("ModelDeployment", "intent-fr", {
            "model": "intent", "replicas": {"min": 1, "max": 1}, "placement": {"residency": ["FR"], "tiers": ["edge"]},
            "rollout": {"strategy": "replaceWhenFull"}})
        return manifests.bundle(manifests.edge_site(SMALL, "FR", SITES[SMALL]["lat"], SITES[SMALL]["lon"], region="fr"),
                                manifests.onnx_model("intent", built.path.name, built.sha256, inputs=inputs), deployment)

    # room for one version's load, as agents() gives, and 16 MiB more: what a load that failed
    # leaves behind in a process that did not load its first version, for the old one's load again
    entry = held_loads(harness.under_memory_limit(7 * v1.path.stat().st_size // 2 + 32 * MB), v2.sha256, gate)
    async with harness.serving_fleet(tmp_path, one_site(v1), {SMALL: {**SITES[SMALL], "entry": entry}}, artifact_roots=(art,),
                                     ready=lambda cp: serving(cp, SMALL) == v1.sha256, what="v1 served", resync_s=0.5) as fleet:
        cp = fleet.cp
        assert cp is not None

        def state() -> agent_model.ModelState | None:
            st = cp.hub.status(SMALL)
            return st.models.get("intent") if st is not None else None

        await apply(cp, one_site(v2, declared))
        await harness.wait_until(lambda: (m := state()) is not None and m.replaced_sha256 == v1.sha256, 60,
                                 what="v1 unloaded first for v2")
        joined = cp.hub.status(SMALL).joined_at  # type: ignore[union-attr]
        fleet.agents[SMALL].kill()  # -9, with v2's load held
        await asyncio.to_thread(fleet.agents[SMALL].process.wait, 10)
        await fleet.restart_agent(SMALL)
        again = await harness.wait_until(
            lambda: (st := cp.hub.status(SMALL)) is not None and st.joined_at > joined and st.reported and state(), 60,
            what="the agent started again to report")
        assert again.sha256 == v2.sha256 and again.serving_sha256 == "", again
        assert again.replaced_sha256 == v1.sha256, again  # not a first load: it unloaded v1 for v2
        await harness.wait_until(lambda: rollout_of(cp).get("replacing") == [SMALL], 20, what="the site shown replacing")

        os.close(await harness.wait_until(lambda: release(gate), 60, what="v2's load to wait on the gate"))
        if new_version == "loads":
            await harness.wait_until(lambda: serving(cp, SMALL) == v2.sha256, 60, what="v2 served")
            await harness.wait_until(lambda: not rollout_of(cp), 20, what="the rollout finished in status")
        else:
            restored = await harness.wait_until(lambda: (m := state()) is not None and m.failures and m, 60,
                                                what="v2 failed")
            assert restored.serving_sha256 == v1.sha256, restored
            assert "the version it replaced was loaded again" in restored.message, restored
            assert restored.replaced_sha256 == "", restored
            assert "halted" in rollout_of(cp), rollout_of(cp)
        assert not (fleet.agents[SMALL].data_dir / "replacing.json").exists()  # nothing under way any more
