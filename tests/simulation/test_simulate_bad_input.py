"""Bad input to ``edgeplane simulate`` and ``POST /v1/simulate``: each option's mistake is a
usage error (exit 2) that names the option as it was typed, a scenario file's is one line
with its line, and no body is a 500."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import httpx
import pytest
import pytest_asyncio


from . import fleets

REPO = pathlib.Path(__file__).resolve().parents[2]
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGEPLANE), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def one_line(proc: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "this is a bug" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--demand", "*=2000"], "--demand '*=2000': factor: Input should be less than or equal to 1000"),
    (["--demand", "eu-west=1e308"], "--demand 'eu-west=1e308': factor:"),
    (["--demand", "91,2.3=2"], "--demand '91,2.3=2': lat: Input should be less than or equal to 90"),
    (["--demand", "eu-west=2", "--demand", "48.8,inf=2"], "--demand '48.8,inf=2': lon:"),
    (["--fail-country", "FR", "--fail-country", "XX"], "--fail-country: 'XX' is not an ISO 3166 alpha-2 country code"),
    (["--capacity", "edge-lyon=2000"], "--capacity 'edge-lyon=2000': Input should be less than or equal to 1000"),
    (["--carbon", "edge-lyon=2e6"], "--carbon 'edge-lyon=2e6': Input should be less than or equal to 1000000"),
])
def test_an_option_the_scenario_cannot_take_is_a_usage_error_naming_it(args: list[str], message: str) -> None:
    one_line(run_cli("simulate", "-f", "manifests/examples", *args), 2, message)


def test_a_scenario_file_that_is_not_yaml_is_one_line_with_its_line(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  fail: {sites: [edge-lyon]\n")
    one_line(run_cli("simulate", "-f", "manifests/examples", "--scenario", str(bad)), 1, f"{bad}:3: not valid YAML (")
    two = tmp_path / "two.yaml"
    two.write_text("spec: {}\n---\nspec: {}\n")
    one_line(run_cli("simulate", "-f", "manifests/examples", "--scenario", str(two)), 1, f"{two}:2: not valid YAML (but found another document)")


def test_a_fleet_file_that_cannot_be_read_is_a_usage_error() -> None:
    one_line(run_cli("simulate", "-f", "/proc/self/mem"), 2, "/proc/self/mem: Input/output error")


def test_a_closed_stdout_ends_a_sweep_quietly() -> None:
    done = subprocess.run(f"'{EDGEPLANE}' simulate -f manifests/examples --each-site -o json | head -1", shell=True,
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout == "{\n" and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory):
    async with fleets.two_sites_served(tmp_path_factory.mktemp("sim-bad")) as cp:
        yield cp


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("params, body, message", [
    ({}, b"[" * 100_000, "<request>: nested too deeply to be a scenario"),
    ({}, b"[]", "<request>: a scenario is a mapping with kind: Scenario and a spec"),
    ({}, b"spec: {}\n---\nspec: {}\n", "<request>:2: not valid YAML (but found another document)"),
    ({}, b"spec: {fail: {sites: [!!bool maybe]}}", "<request>:1: not valid YAML (cannot read 'maybe' as bool)"),
    ({}, b'{"spec": {"sites": {"edge-a": {"capacityFactor": 0.5}, "edge-a": {"carbonGramsPerKWh": 900}}}}',
     "<request>:1: not valid YAML (duplicate key 'edge-a')"),
    ({"each": "site", "top": "0"}, b"", "top must be 1 or more"),
    ({"each": "site", "top": "-2"}, b"", "top must be 1 or more (how many of the most harmful to keep), not -2"),
])
async def test_a_scenario_body_or_parameter_that_cannot_work_is_refused_not_a_500(served, params: dict[str, str], body: bytes,  # type: ignore[no-untyped-def]
                                                                                 message: str) -> None:
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        resp = await http.post("/v1/simulate", params=params, content=body)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": message} or message in resp.json()["error"]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("params", [{"Top": "5"}, {"each": "site", "tops": "5"}, {"dry_run": "true"}])
async def test_an_unknown_query_parameter_is_refused_not_ignored(served, params: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """As on every other route: read as nothing, a misspelt ``top`` was answered as if it had not been given."""
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        resp = await http.post("/v1/simulate", params=params, content=b"")
    assert resp.status_code == 400, resp.text
    unknown = next(k for k in params if k not in ("each", "top"))
    assert resp.json()["error"] == f"unknown query parameter {unknown!r}: this route takes each, top"


@pytest.mark.asyncio(loop_scope="module")
async def test_an_empty_body_is_the_fleet_as_it_is(served) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        for body in (b"", b"null", b"{}"):
            resp = await http.post("/v1/simulate", content=body)
            assert resp.status_code == 200 and json.loads(resp.text)["scenario"] == "no change", resp.text


DEMANDED = """
apiVersion: edgeplane.io/v1alpha1
kind: Model
metadata: {name: m1}
spec:
  variants:
    - name: small
      runtime: onnx
      artifact: {uri: m1.onnx, sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}
      resources: {cpu: 1, memoryMiB: 256}
      throughputRps: 100
---
apiVersion: edgeplane.io/v1alpha1
kind: ModelDeployment
metadata: {name: d1}
spec:
  model: m1
  replicas: {min: 1, max: 2}
  demand: [{region: fr, rps: 50}, {region: de, rps: 50}]
"""


@pytest.mark.asyncio(loop_scope="module")
async def test_demand_changes_multiplying_past_the_float_range_are_refused_not_a_500(served) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=served.http_url) as http:
        resp = await http.post("/v1/apply", content=DEMANDED)
        assert resp.status_code == 200, resp.text
        body = "spec:\n  demand:\n" + "    - {factor: 1000}\n" * 110
        refused = await http.post("/v1/simulate", content=body)
        zero = await http.post("/v1/simulate", content=body + "    - {factor: 0}\n")
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"].startswith("spec.demand: the demand changes matching fr of deployment 'd1' multiply it")
    assert zero.status_code == 200, zero.text
    assert [p["rps"] for p in zero.json()["after"]["demand"]] == [0, 0]
