"""``POST /v1/simulate``, ``edgeplane simulate`` and the console's files, on a real control plane.

The control plane runs in-process with token auth and the example fleet applied (no agents:
edge sites are NoAgent, so today's placement is what the planner could place without them);
the CLI runs as the installed command in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys

import httpx
import pytest
import pytest_asyncio

from orchestrator.testing import harness

from . import fleets

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = pathlib.Path(__file__).resolve().parents[2]
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory):
    f = harness.Fleet(tmp_path_factory.mktemp("sim"))
    try:
        cp = await f.start_control_plane(auth="token")
        admin = cp.admin_token
        read, _ = cp.store.create_token("api", "read", None, "test", "read-only")
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
            resp = await http.post("/v1/apply", content=fleets.TWO_SITES)
            assert resp.status_code == 200, resp.text
        yield cp, admin, read
    finally:
        await f.stop()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGEPLANE), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


async def test_simulate_needs_a_token_and_a_read_token_is_enough(served) -> None:  # type: ignore[no-untyped-def]
    cp, _, read = served
    body = {"kind": "Scenario", "spec": {"fail": {"sites": ["edge-a"]}}}
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        refused = await http.post("/v1/simulate", json=body)
        ok = await http.post("/v1/simulate", json=body, headers={"authorization": f"Bearer {read}"})
    assert refused.status_code == 401
    assert ok.status_code == 200, ok.text
    data = ok.json()
    assert data["scenario"] == "fail site edge-a" and data["summary"]["residencyCrossings"] == 0


@pytest.mark.parametrize("params, body, status, message", [
    ({}, "spec: {fail: {sites: [nowhere]}}", 422, "site 'nowhere' is not in the fleet"),
    ({}, "spec: {fail: {site: [edge-a]}}", 422, "spec.fail.site: Extra inputs are not permitted"),
    ({}, "spec: [", 422, "not valid YAML"),
    ({"each": "planet"}, "", 422, "each must be one of site, region"),
    ({"top": "x"}, "", 400, "top must be an integer"),
])
async def test_bad_requests_get_one_clear_error(served, params: dict[str, str], body: str, status: int, message: str) -> None:  # type: ignore[no-untyped-def]
    cp, admin, _ = served
    async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
        resp = await http.post("/v1/simulate", params=params, content=body)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]


async def test_a_sweep_by_region_ranks_every_region(served) -> None:  # type: ignore[no-untyped-def]
    cp, admin, _ = served
    async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
        resp = await http.post("/v1/simulate", params={"each": "region", "top": "1"})
    data = resp.json()
    assert (data["by"], data["swept"], len(data["ranked"])) == ("region", 2, 1)
    assert data["scenario"] == "no change"
    async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
        resp = await http.post("/v1/simulate", params={"each": "region"}, content="spec: {fail: {regions: [fr]}}")
    data = resp.json()  # the sweep starts from the scenario: what it failed is not lost again
    assert (data["scenario"], data["swept"], [i["target"] for i in data["ranked"]]) == ("fail region fr", 1, ["de"])


async def test_the_leader_s_what_if_repairs_its_plan_in_force_as_its_next_pass_would(served) -> None:  # type: ignore[no-untyped-def]
    """The fleet at rest, the reconciler keeps its plan as the one in force; a site lost is
    answered by a repair of a copy of it (tests/foundation/test_whatif_repair.py), and said so."""
    cp, admin, _ = served
    for _ in range(5):  # the pass after the one that placed the fleet finds it at rest
        if cp.reconciler.plan_in_force() is not None:
            break
        passes = cp.reconciler.passes
        cp.reconciler.trigger("test")
        await cp.reconciler.wait_for_pass(passes)
    in_force = cp.reconciler.plan_in_force()
    assert in_force is not None
    async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
        for _ in range(5):  # asked while a pass held the plan in force, it plans in full: asked again after that pass
            passes = cp.reconciler.passes
            resp = await http.post("/v1/simulate", content="spec: {fail: {sites: [edge-a]}}")
            if resp.json().get("method") == "repair" or cp.reconciler.passes == passes:
                break
    assert resp.status_code == 200 and resp.json()["method"] == "repair", resp.text


async def test_the_cli_simulates_against_the_control_plane(served) -> None:  # type: ignore[no-untyped-def]
    cp, _, read = served
    proc = await asyncio.to_thread(run_cli, "--server", cp.http_url, "--token", read, "simulate", "--fail-region", "fr", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scenario"] == "fail region fr"
    bad = await asyncio.to_thread(run_cli, "--server", cp.http_url, "--token", read, "simulate", "--fail-site", "nope")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: site 'nope' is not in the fleet"


async def test_the_console_files_are_served_without_a_token(served) -> None:  # type: ignore[no-untyped-def]
    cp, _, _ = served
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        redirect = await http.get("/ui")
        page = await http.get("/ui/")
        iso = await http.get("/ui/iso-countries.json")
        world = await http.get("/ui/vendor/countries-110m.json")
        data = await http.get("/v1/sites")
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"
    assert page.status_code == 200 and "edgeplane console" in page.text
    assert iso.json()["250"] == "FR" and iso.json()["276"] == "DE"
    assert world.status_code == 200 and world.json()["type"] == "Topology"
    assert data.status_code == 401  # the data behind the page still needs the token


async def test_the_console_s_files_are_checked_for_changes_before_each_use(served) -> None:  # type: ignore[no-untyped-def]
    """After an upgrade a browser must not run the old app.js it kept with the new page: it
    keeps the files, but asks whether each changed (a 304 when not)."""
    cp, _, _ = served
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        for path in ("/ui/", "/ui/app.js", "/ui/api.js", "/ui/map.js", "/ui/console.css", "/ui/vendor/countries-110m.json"):
            resp = await http.get(path)
            assert (resp.status_code, resp.headers.get("cache-control")) == (200, "no-cache"), path
            again = await http.get(path, headers={"if-none-match": resp.headers["etag"]})
            assert again.status_code == 304, path


async def test_the_console_cannot_be_framed_and_loads_only_its_own_files(served) -> None:  # type: ignore[no-untyped-def]
    """The page takes a bearer token: another site must not frame it, nor the browser sniff its files."""
    cp, _, _ = served
    async with httpx.AsyncClient(base_url=cp.http_url) as http:
        responses = [await http.get(path) for path in ("/ui", "/ui/", "/ui/app.js", "/ui/iso-countries.json", "/ui/vendor/countries-110m.json")]
    for resp in responses:
        h = resp.headers
        assert h["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'; object-src 'none'", resp.url
        assert (h["x-frame-options"], h["x-content-type-options"], h["referrer-policy"]) == ("DENY", "nosniff", "no-referrer"), resp.url
