"""``edgeplane simulate -f``: the fleet of manifests simulated here, no control plane."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
EDGEPLANE = pathlib.Path(sys.executable).parent / "edgeplane"
SCENARIO = REPO / "manifests" / "scenarios" / "lyon-dark.yaml"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EDGEPLANE), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_the_fleet_may_span_several_files_and_folders(tmp_path: pathlib.Path) -> None:
    sites = tmp_path / "sites.yaml"
    sites.write_text((REPO / "manifests" / "examples" / "sites.yaml").read_text())
    rest = tmp_path / "rest"
    rest.mkdir()
    for name in ("models.yaml", "deployments.yaml"):
        (rest / name).write_text((REPO / "manifests" / "examples" / name).read_text())
    proc = run_cli("simulate", "-f", str(sites), "-f", str(rest), "--fail-site", "edge-lyon", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert "simulated in" in proc.stderr and "reading the manifests" in proc.stderr


def test_the_cli_simulates_the_examples_offline() -> None:
    proc = run_cli("simulate", "-f", "manifests/examples", "--scenario", str(SCENARIO), "-o", "yaml")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["name"] == "lyon-dark" and data["summary"]["residencyCrossings"] == 0
    assert all(m["from"] == "edge-lyon" for m in data["moves"]) and data["moves"]
    assert {p["point"] for p in data["after"]["demand"]} >= {"eu-central", "eu-west"}
    assert next(p for p in data["after"]["demand"] if p["point"] == "eu-central")["rps"] == 2 * next(
        p for p in data["before"]["demand"] if p["point"] == "eu-central")["rps"]
    table = run_cli("simulate", "-f", "manifests/examples", "--each-site")
    assert table.returncode == 0 and "N-1 sweep by site: 6 lost" in table.stdout
    under = run_cli("simulate", "-f", "manifests/examples", "--each-site", "--fail-site", "edge-lyon", "-o", "json")
    assert under.returncode == 0, under.stderr
    swept = json.loads(under.stdout)
    assert swept["scenario"] == "fail site edge-lyon" and swept["swept"] == 5
    assert "edge-lyon" not in {i["target"] for i in swept["ranked"]}


def test_a_lowered_power_budget_from_the_command_line_moves_what_it_no_longer_covers() -> None:
    proc = run_cli("simulate", "-f", "manifests/examples", "--power-budget", "edge-lyon=1", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["scenario"] == "edge-lyon power budget 1 W", data["scenario"]
    gone = data["moves"] + [r for r in data["removed"] if r["site"] == "edge-lyon"]
    assert gone and all(m.get("from", m.get("site")) == "edge-lyon" and "power budget" in m["reason"] for m in gone), gone


def test_a_scenario_file_without_a_spec_takes_the_command_line_changes(tmp_path: pathlib.Path) -> None:
    drill = tmp_path / "drill.yaml"
    drill.write_text("apiVersion: edgeplane.io/v1alpha1\nkind: Scenario\nmetadata: {name: drill}\n")
    proc = run_cli("simulate", "-f", "manifests/examples", "--scenario", str(drill), "--fail-site", "edge-lyon", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["name"] == "drill"
    assert data["moves"] and all(m["from"] == "edge-lyon" for m in data["moves"])


@pytest.mark.parametrize("args, code, message", [
    (["--demand", "eu-west"], 2, "--demand 'eu-west': expected NAME=NUMBER"),
    (["--scenario", "missing.yaml"], 2, "missing.yaml"),
    (["--fail-country", "XX"], 2, "--fail-country: 'XX' is not an ISO 3166 alpha-2 country code"),
    (["--each-site", "--top", "0"], 2, "argument --top: 0 is not 1 or more"),
    (["--carbon", "edge-lyon=-5"], 2, "--carbon 'edge-lyon=-5': the number must be 0 or more"),
    (["--capacity", "edge-lyon=-1"], 2, "--capacity 'edge-lyon=-1': the number must be 0 or more"),
    (["--demand", "eu-west=nan"], 2, "--demand 'eu-west=nan': the number must be 0 or more"),
    (["--capacity", "edge-lyon=2000"], 2, "--capacity 'edge-lyon=2000': Input should be less than or equal to 1000"),
    (["--power-budget", "edge-lyon=0"], 2, "--power-budget 'edge-lyon=0': Input should be greater than 0"),
    (["-f", "manifests/examples/sites.yaml"], 1, "Site 'dc-paris' is also declared in"),
])
def test_bad_cli_input_is_one_line(args: list[str], code: int, message: str) -> None:
    proc = run_cli("simulate", "-f", "manifests/examples", *args)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_two_deployments_of_one_model_never_share_an_edge_site(tmp_path: pathlib.Path) -> None:
    """From manifests, as a pass plans them: the agent of edge-lyon serves the model for one
    deployment, so the second gets no replica there and says which deployment holds it."""
    docs = list(yaml.safe_load_all((REPO / "manifests" / "examples" / "sites.yaml").read_text()))
    lyon = next(d for d in docs if d["metadata"]["name"] == "edge-lyon")
    models = [d for d in yaml.safe_load_all((REPO / "manifests" / "examples" / "models.yaml").read_text())
              if d["metadata"]["name"] == "intent-classifier"]
    deployments = [
        {"apiVersion": "edgeplane.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
         "spec": {"model": "intent-classifier", "variant": "distilled", "replicas": {"min": 1, "max": 1},
                  "placement": {"residency": ["FR"], "tiers": ["edge"]}}}
        for name in ("intent-a", "intent-b")
    ]
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump_all([lyon, *models, *deployments]))
    proc = run_cli("simulate", "-f", str(tmp_path), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["before"]["replicas"] == 1
    (short,) = report["unschedulable"]
    assert short["deployment"] == "intent-b" and short["placed"] == 0 and short["phase"] == "Unschedulable"
    assert "(edge-lyon) run model intent-classifier for deployment intent-a" in short["reason"]


def test_a_scale_to_zero_deployment_starts_at_zero_offline_as_it_does_on_apply(tmp_path: pathlib.Path) -> None:
    """The control plane starts an autoscaled deployment with ``replicas.min: 0`` at zero,
    whatever demand it declares, until a request comes; one with a minimum gets its count
    from its demand until load is reported. ``simulate -f`` plans today the same way."""
    model = ("apiVersion: edgeplane.io/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\nspec:\n  variants:\n"
             "    - {{name: small, runtime: onnx, resources: {{cpu: 1, memoryMiB: 256}}, throughputRps: 100,\n"
             "       artifact: {{uri: {name}.onnx, sha256: {sha}}}}}\n")
    deployment = ("apiVersion: edgeplane.io/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\n"
                  "spec: {{model: {name}, replicas: {{min: {min}, max: 4}}, autoscaling: {{targetRps: 50}},"
                  " demand: [{{region: fr, rps: 300}}]}}\n")
    site = ("apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {name: edge-a}\n"
            "spec: {tier: edge, location: {country: FR, region: fr, lat: 48.8, lon: 2.3}, capacity: {cpu: 8, memoryGiB: 16}}\n")
    (tmp_path / "fleet.yaml").write_text("---\n".join([
        site, *(model.format(name=n, sha="a" * 64) for n in ("cold", "warm")),
        deployment.format(name="cold", min=0), deployment.format(name="warm", min=1)]))
    proc = run_cli("simulate", "-f", str(tmp_path), "--demand", "fr=2", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["before"]["replicas"] == 3  # warm: 300 rps at 100 a replica; cold: none
    assert report["after"]["replicas"] == 4 and report["unschedulable"] == []  # warm at its maximum; cold still none


def test_the_text_report_says_when_it_shows_only_some_deployments_short(tmp_path: pathlib.Path) -> None:
    """Losing the only site leaves 60 deployments short: the table shows 50 and says so,
    as it does for moves, rather than letting a planner read 50 as all of them."""
    model = ("apiVersion: edgeplane.io/v1alpha1\nkind: Model\nmetadata: {name: m}\nspec:\n  variants:\n"
             f"    - {{name: small, runtime: onnx, resources: {{cpu: 1, memoryMiB: 256}}, artifact: {{uri: m.onnx, sha256: {'a' * 64}}}}}\n")
    site = ("apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {name: dc-a}\n"
            "spec: {tier: datacenter, location: {country: FR, region: fr, lat: 48.8, lon: 2.3}, capacity: {cpu: 100, memoryGiB: 100}, ray: {address: local}}\n")
    deployment = ("apiVersion: edgeplane.io/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: d{n:02d}}}\n"
                  "spec: {{model: m, replicas: {{min: 1, max: 1}}, demand: [{{lat: {lat}, lon: 2.3, rps: 1}}]}}\n")
    (tmp_path / "fleet.yaml").write_text("---\n".join([site, model, *(deployment.format(n=n, lat=40 + n / 10) for n in range(60))]))
    proc = run_cli("simulate", "-f", str(tmp_path), "--fail-site", "dc-a")
    assert proc.returncode == 0, proc.stderr
    assert "60 no longer fit" in proc.stdout
    assert "d49" in proc.stdout and "d50" not in proc.stdout
    assert "... and 10 more deployments short (-o json for all)" in proc.stdout
    assert "... and 10 more demand points (-o json for all)" in proc.stdout


def test_a_loss_that_leaves_demand_unserved_says_how_much_in_each_column(tmp_path: pathlib.Path) -> None:
    """The example fleet with Lyon its only edge site: losing it leaves the edge-only
    assistant unplaced, and at Paris the p50 falls from 5.9 to 2.0 ms (what stays there moves
    to dc-paris) while a fifth of Paris's demand has no replica. Each column says how much
    demand is unserved, and the percentiles say they count it as slowest."""
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "examples" / "sites.yaml").read_text())
            if d and d["metadata"]["name"] in ("dc-paris", "dc-frankfurt", "edge-lyon")]
    (tmp_path / "sites.yaml").write_text(yaml.safe_dump_all(docs))
    for name in ("models.yaml", "deployments.yaml"):
        (tmp_path / name).write_text((REPO / "manifests" / "examples" / name).read_text())
    proc = run_cli("simulate", "-f", str(tmp_path), "--fail-site", "edge-lyon", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (short,) = data["unschedulable"]
    assert short["deployment"] == "assistant" and short["placed"] == 0
    before = {p["point"]: p for p in data["before"]["demand"]}
    after = {p["point"]: p for p in data["after"]["demand"]}
    paris = "48.86,2.35"
    assert after[paris]["p50Ms"] < before[paris]["p50Ms"]  # what still serves Paris is nearer
    assert (before[paris]["unservedRps"], after[paris]["unservedRps"]) == (0, 20)  # the assistant's 20 rps
    assert after["eu-central"]["unservedRps"] == 10
    total = sum(p["rps"] for p in data["before"]["demand"])
    assert data["before"]["demandRps"] == data["after"]["demandRps"] == total
    assert data["after"]["unservedRps"] == data["before"]["unservedRps"] + 30
    text = run_cli("simulate", "-f", str(tmp_path), "--fail-site", "edge-lyon")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any(line.split() == ["unserved", "rps", "(share", "of", "demand)", "150", "of", f"{total:g}", "(18%)",
                                "180", "of", f"{total:g}", "(21%)"] for line in lines), text.stdout
    assert any(line.startswith("latency p50 ms, unserved as slowest") for line in lines), text.stdout
    assert "UNSERVED RPS TODAY" in text.stdout
    assert next(line for line in lines if line.startswith(paris)).split() == [paris, "100", "5.9", "5.9", "0", "2.0", "unserved", "20"]


def _full_edge_fleet(root: pathlib.Path) -> None:
    """16 full edge sites: edge-00 runs three deployments, the others one each, and nothing
    has room for another, so losing any site leaves what it ran short."""
    site = ("apiVersion: edgeplane.io/v1alpha1\nkind: Site\nmetadata: {{name: edge-{n:02d}}}\n"
            "spec: {{tier: edge, location: {{country: FR, region: fr, lat: {lat}, lon: 2.3}}, capacity: {{cpu: {cpu}, memoryGiB: 8}}}}\n")
    model = ("apiVersion: edgeplane.io/v1alpha1\nkind: Model\nmetadata: {{name: m{n:02d}}}\nspec:\n  variants:\n"
             "    - {{name: small, runtime: onnx, resources: {{cpu: 1, memoryMiB: 256}}, artifact: {{uri: m.onnx, sha256: {sha}}}}}\n")
    deployment = ("apiVersion: edgeplane.io/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: d{n:02d}}}\n"
                  "spec: {{model: m{n:02d}, replicas: {{min: 1, max: 1}}, placement: {{tiers: [edge]}}}}\n")
    (root / "fleet.yaml").write_text("---\n".join([
        *(site.format(n=n, lat=40 + n / 10, cpu=3 if n == 0 else 1) for n in range(16)),
        *(model.format(n=n, sha="a" * 64) for n in range(18)), *(deployment.format(n=n) for n in range(18))]))


def test_the_sweep_table_says_how_many_rows_it_leaves_out(tmp_path: pathlib.Path) -> None:
    """16 sites swept, 15 rows shown by default: the table says one more exists, and how to
    see it, as the report's other tables do."""
    _full_edge_fleet(tmp_path)
    proc = run_cli("simulate", "-f", str(tmp_path), "--each-site")
    assert proc.returncode == 0, proc.stderr
    assert "N-1 sweep by site: 16 lost one at a time" in proc.stdout
    assert "... and 1 more (--top N or -o json for all)" in proc.stdout
    top = run_cli("simulate", "-f", str(tmp_path), "--each-site", "--top", "3")
    assert top.returncode == 0, top.stderr
    assert "... and 13 more (a larger --top for more)" in top.stdout
    everything = run_cli("simulate", "-f", str(tmp_path), "--each-site", "--top", "16")
    assert everything.returncode == 0 and "more" not in everything.stdout, everything.stdout


def test_the_sweep_table_names_the_deployments_each_loss_leaves_short(tmp_path: pathlib.Path) -> None:
    """Which deployments go short was only in -o json: the text table names the first two
    of each row and counts the rest."""
    _full_edge_fleet(tmp_path)
    data = json.loads(run_cli("simulate", "-f", str(tmp_path), "--each-site", "-o", "json").stdout)
    first = data["ranked"][0]
    assert first["target"] == "edge-00" and len(first["deploymentsShort"]) == 3
    proc = run_cli("simulate", "-f", str(tmp_path), "--each-site")
    assert proc.returncode == 0, proc.stderr
    assert "DEPLOYMENTS SHORT" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if " edge-00 " in line)
    a, b, _ = first["deploymentsShort"]
    assert f"{a}, {b} +1" in row, row
    for i in data["ranked"][1:15]:
        (name,) = i["deploymentsShort"]
        assert any(f" {i['target']} " in line and name in line for line in proc.stdout.splitlines()), (i, proc.stdout)


def test_a_sweep_of_a_fleet_that_declares_no_demand_says_so_not_unserved(tmp_path: pathlib.Path) -> None:
    """No deployment declares demand: there is no latency to take a percentile of, which the
    single report says as 'no demand'; the sweep's P95 column said 'unserved', as if every
    caller had lost its replica."""
    _full_edge_fleet(tmp_path)
    proc = run_cli("simulate", "-f", str(tmp_path), "--each-site", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if " edge-" in line]
    assert len(rows) == 3 and all("no demand" in row and "unserved" not in row for row in rows), proc.stdout
