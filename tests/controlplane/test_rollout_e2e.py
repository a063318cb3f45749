"""Rollouts with real agents: a new version reaches a canary first and one site at a
time; a version the canary cannot load, or whose file does not take what its variant
declares, halts the rollout with every site still serving."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import re

import httpx
import pytest
import pytest_asyncio

from orchestrator.cli import main as cli_main
from orchestrator.cli import objects
from orchestrator.testing import harness, manifests, onnx_models

SITES = {
    "edge-paris": dict(country="FR", lat=48.8566, lon=2.3522),
    "edge-berlin": dict(country="DE", lat=52.52, lon=13.405),
    "edge-madrid": dict(country="ES", lat=40.4168, lon=-3.7038),
}


#: What the Model's variant declares it takes and answers, when a test declares them.
DECLARED = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 4]}]}


def fleet_yaml(uri: str, sha256: str, sites: dict[str, dict] = SITES, declared: dict[str, list] | None = None,
               replicas: int | None = None) -> str:
    n = len(sites) if replicas is None else replicas
    deployment = manifests.doc("ModelDeployment", "intent-eu", {
        "model": "intent",
        "replicas": {"min": n, "max": n},
        "placement": {"residency": ["EU"], "tiers": ["edge"], "spread": {"by": "site", "maxSkew": 1}},
        "rollout": {"canarySteps": [30], "maxUnavailable": 1},
    })
    return manifests.bundle(*(manifests.edge_site(n, **w) for n, w in sites.items()),
                            manifests.onnx_model("intent", uri, sha256, **(declared or {})), deployment)


@pytest_asyncio.fixture
async def fleet(tmp_path: pathlib.Path):
    f = harness.Fleet(tmp_path)
    try:
        await f.start_control_plane(resync_s=0.5)
        yield f
    finally:
        await f.stop()


async def apply(cp, body: str) -> None:  # noqa: ANN001
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        resp = await http.post("/v1/apply", content=body)
        assert resp.status_code == 200, resp.text


def sent(cp, sha: str) -> set[str]:  # noqa: ANN001
    return {s for s in SITES if (a := cp.hub.assignments(s)) is not None and any(x.sha256 == sha for x in a.assignments)}


def serving(cp, sha: str) -> set[str]:  # noqa: ANN001
    return {s for s in SITES if (st := cp.hub.status(s)) is not None and (m := st.models.get("intent")) is not None
            and m.serving_sha256 == sha}


async def serving_v1(fleet: harness.Fleet, art: pathlib.Path, declared: dict[str, list] | None = None) -> onnx_models.BuiltModel:
    """Version 1 applied, an agent at each of SITES, and every one serving it; its file."""
    assert fleet.cp is not None
    v1 = onnx_models.build_mlp(art / "v1.onnx", in_dim=8, hidden=16, out_dim=4, seed=1)
    await apply(fleet.cp, fleet_yaml("v1.onnx", v1.sha256, declared=declared))
    for site, where in SITES.items():
        await fleet.start_agent(site, **where)
    await harness.wait_until(lambda: serving(fleet.cp, v1.sha256) == set(SITES), 60, what="v1 everywhere")
    return v1


async def test_canary_first_one_site_at_a_time_then_a_bad_version_halts(fleet: harness.Fleet, tmp_path: pathlib.Path) -> None:
    cp = fleet.cp
    assert cp is not None
    art = tmp_path / "artifacts"
    await serving_v1(fleet, art)
    v2 = onnx_models.build_mlp(art / "v2.onnx", in_dim=8, hidden=16, out_dim=4, seed=2)

    # Watch every state the control plane passes through while v2 rolls out.
    too_many_switching, ahead_of_canary, first_sent, stop = [], [], [], asyncio.Event()

    async def watch() -> None:
        for _ in range(20_000):  # bounded: at most ~100 s at 5 ms
            if stop.is_set():
                return
            on_v2, sent_v2 = serving(cp, v2.sha256), sent(cp, v2.sha256)
            if sent_v2 and not first_sent:
                first_sent.append(sent_v2)
            if len(sent_v2 - on_v2) > 1:
                too_many_switching.append(sent_v2 - on_v2)
            if not on_v2 and len(sent_v2) > 1:
                ahead_of_canary.append(sent_v2)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    await apply(cp, fleet_yaml("v2.onnx", v2.sha256))
    await harness.wait_until(lambda: serving(cp, v2.sha256) == set(SITES), 60, what="v2 everywhere")
    stop.set()
    await watcher
    assert len(first_sent[0]) == 1, first_sent  # the canary alone
    assert not too_many_switching, too_many_switching  # maxUnavailable: 1
    assert not ahead_of_canary, ahead_of_canary  # canarySteps: [30] -> one site first
    await harness.wait_until(lambda: "rollout" not in (cp.store.get("ModelDeployment", "intent-eu").status or {}), 20,
                             what="rollout finished in status")

    # v3 passes the control plane's sha256 check but is no ONNX model: the canary fails it.
    garbage = b"not an onnx model" * 64
    (art / "v3.onnx").write_bytes(garbage)
    v3 = hashlib.sha256(garbage).hexdigest()
    await apply(cp, fleet_yaml("v3.onnx", v3))

    def halted() -> dict | None:
        obj = cp.store.get("ModelDeployment", "intent-eu")
        rollout = (obj.status or {}).get("rollout", {}) if obj is not None else {}
        return obj.status if "halted" in rollout else None

    status = await harness.wait_until(halted, 60, what="the rollout halted")
    assert status["phase"] == "Failing"
    assert "could not load version" in status["rollout"]["halted"] and "could not load version" in status["reason"]
    assert len(sent(cp, v3)) == 1 and len(sent(cp, v2.sha256)) == 2  # nobody else was sent v3
    assert serving(cp, v2.sha256) == set(SITES)  # and every site still answers, on v2

    # While halted, a site placed anew gets the version the others keep, from the URL they
    # got it from (not the halted version's URL, whose bytes are another sha256).
    rome = dict(country="IT", lat=41.9028, lon=12.4964)
    await apply(cp, fleet_yaml("v3.onnx", v3, {**SITES, "edge-rome": rome}))
    await fleet.start_agent("edge-rome", **rome)

    def rome_serves() -> str:
        st = cp.hub.status("edge-rome")
        m = st.models.get("intent") if st is not None else None
        return m.serving_sha256 if m is not None else ""

    await harness.wait_until(lambda: rome_serves() == v2.sha256, 60, what="the new site serving the kept version")
    kept_url = {a.artifact_url for s in SITES for a in cp.hub.assignments(s).assignments if a.sha256 == v2.sha256}
    (rome_sent,) = cp.hub.assignments("edge-rome").assignments
    assert (rome_sent.sha256, {rome_sent.artifact_url}) == (v2.sha256, kept_url)
    assert len(sent(cp, v3)) == 1 and serving(cp, v2.sha256) == set(SITES)  # still halted


async def test_plan_shows_a_new_version_as_a_version_roll_on_each_site(fleet: harness.Fleet, tmp_path: pathlib.Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cp = fleet.cp
    assert cp is not None
    art = tmp_path / "artifacts"
    v1 = await serving_v1(fleet, art)
    v2 = onnx_models.build_mlp(art / "v2.onnx", in_dim=8, hidden=16, out_dim=4, seed=2)
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        resp = await http.post("/v1/apply", params={"dryRun": "true"}, content=fleet_yaml("v2.onnx", v2.sha256))
        assert resp.status_code == 200, resp.text
    plan = resp.json()["plan"]
    rolls = {c["site"]: (c["change"], c["before"], c["after"], c.get("previousVersion"), c.get("version")) for c in plan["changes"]}
    assert rolls == {s: ("new version", 1, 1, v1.sha256[:12], v2.sha256[:12]) for s in SITES}, plan["changes"]
    manifest = tmp_path / "v2.yaml"
    manifest.write_text(fleet_yaml("v2.onnx", v2.sha256))
    code = await asyncio.to_thread(cli_main.main, ["--server", cp.http_url, "plan", "-f", str(manifest), "--exit-code"])
    printed = capsys.readouterr().out
    assert code == objects.EXIT_CHANGES, printed
    assert "No replica changes" not in printed, printed
    for site in SITES:
        assert re.search(rf"{site}\s.*new version {v1.sha256[:12]} -> {v2.sha256[:12]}", printed), printed


async def test_a_version_whose_file_breaks_the_declared_inputs_halts_while_callers_see_no_error(
        fleet: harness.Fleet, tmp_path: pathlib.Path) -> None:
    cp = fleet.cp
    assert cp is not None
    art = tmp_path / "artifacts"
    await serving_v1(fleet, art, declared=DECLARED)
    v2 = onnx_models.build_mlp(art / "v2.onnx", in_dim=8, hidden=32, out_dim=4, seed=2)  # its batch axis is symbolic
    v3 = onnx_models.build_mlp(art / "v3.onnx", in_dim=5, hidden=16, out_dim=4, seed=3)  # takes [-1, 5]

    # A version that takes what the variant declares ("batch" where it says -1) rolls out.
    await apply(cp, fleet_yaml("v2.onnx", v2.sha256, declared=DECLARED))
    await harness.wait_until(lambda: serving(cp, v2.sha256) == set(SITES), 60, what="v2 everywhere")

    def halted() -> dict | None:
        obj = cp.store.get("ModelDeployment", "intent-eu")
        return obj.status if obj is not None and "halted" in (obj.status or {}).get("rollout", {}) else None

    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]}
    failures: list[str] = []
    answered = 0

    async def call(http: httpx.AsyncClient, n: int) -> None:
        nonlocal answered
        where = list(SITES.values())[n % len(SITES)]  # each site nearest in turn
        headers = {"x-edgeplane-location": f"{where['lat']},{where['lon']}", "x-edgeplane-residency": "EU"}
        r = await http.post("/v2/models/intent/infer", json=body, headers=headers)
        if r.status_code != 200:
            failures.append(f"{r.status_code}: {r.text[:200]}")
        answered += 1

    # v3's file takes [-1, 5] where the variant declares [-1, 8]: callers go on as declared.
    await apply(cp, fleet_yaml("v3.onnx", v3.sha256, declared=DECLARED))
    async with httpx.AsyncClient(base_url=cp.http_url, timeout=30) as http:
        for n in range(3000):  # bounded: until the roll halted or went everywhere
            if halted() is not None or serving(cp, v3.sha256) == set(SITES):
                break
            await call(http, n)
        for n in range(30):  # and after
            await call(http, n)
    status = halted()
    assert status is not None, (failures[:3], cp.store.get("ModelDeployment", "intent-eu").status)
    assert failures == [], failures[:5]
    assert answered > 30
    assert status["phase"] == "Failing"
    for reason in (status["reason"], status["rollout"]["halted"]):
        assert "could not load version" in reason and "input 'input'" in reason, reason
        assert "[-1, 8]" in reason and "[-1, 5]" in reason, reason
    assert len(sent(cp, v3.sha256)) == 1 and serving(cp, v2.sha256) == set(SITES)
    # The declaration goes with the version it was written for, never with a kept one (which
    # a changed declaration may not fit, on a new site or a restarted agent).
    kept = [a for s in SITES for a in cp.hub.assignments(s).assignments if a.sha256 == v2.sha256]
    assert len(kept) == 2 and all(a.inputs == () and a.outputs == () for a in kept), kept


async def test_plan_shows_a_new_version_beside_a_replica_change(fleet: harness.Fleet, tmp_path: pathlib.Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A new version applied with another replica count: each site keeping replicas reads
    both, its count's change and the version roll."""
    cp = fleet.cp
    assert cp is not None
    art = tmp_path / "artifacts"
    v1 = await serving_v1(fleet, art)
    v2 = onnx_models.build_mlp(art / "v2.onnx", in_dim=8, hidden=16, out_dim=4, seed=2)
    doubled = fleet_yaml("v2.onnx", v2.sha256, replicas=2 * len(SITES))
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        resp = await http.post("/v1/apply", params={"dryRun": "true"}, content=doubled)
        assert resp.status_code == 200, resp.text
    plan = resp.json()["plan"]
    rolls = {c["site"]: (c["change"], c["before"], c["after"], c.get("previousVersion"), c.get("version")) for c in plan["changes"]}
    assert rolls == {s: ("added", 1, 2, v1.sha256[:12], v2.sha256[:12]) for s in SITES}, plan["changes"]
    manifest = tmp_path / "v2.yaml"
    manifest.write_text(doubled)
    code = await asyncio.to_thread(cli_main.main, ["--server", cp.http_url, "plan", "-f", str(manifest), "--exit-code"])
    printed = capsys.readouterr().out
    assert code == objects.EXIT_CHANGES, printed
    for site in SITES:
        assert re.search(rf"{site}\s.*\badded, new version {v1.sha256[:12]} -> {v2.sha256[:12]}", printed), printed
