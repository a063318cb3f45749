"""``edgeplane apply``, ``plan`` and ``delete`` of manifests as a subprocess against
``edgeplane serve`` as a subprocess: directories, stdin and repeated ``-f`` as one atomic
bundle, dependants deleted first, dry runs, and what ``get`` prints applied again."""

from __future__ import annotations

import json
import pathlib
import re

import yaml

from . import support
from .support import cli, doc, ok


def test_apply_a_directory(applied, offline_fleet: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    expected = support.example_names()
    lines = applied.stdout.splitlines()
    want = {f"{kind.lower()}/{name} created" for kind, names in expected.items() for name in names}
    assert set(lines) == want, applied.stdout


def test_what_get_prints_applies_again(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """kubectl's edit loop: get -o yaml|json, change the spec, apply. Status and the
    server-set metadata are ignored; the resourceVersion read makes the apply conditional."""
    for kind, fmt in (("modeldeployments", "yaml"), ("sites", "json")):
        listed = tmp_path / f"{kind}.{fmt}"
        listed.write_text(ok("get", kind, "-o", fmt, server=serve))
        out = ok("apply", "-f", str(listed), server=serve).splitlines()
        assert out and all(line.endswith(" unchanged") for line in out), out
    site = tmp_path / "site.yaml"
    site.write_text(doc("Site", "edge-roundtrip", support.edge_site_spec()).replace(
        "  name: edge-roundtrip\n", "  name: edge-roundtrip\n  annotations: {owner: team-x}\n"))
    ok("apply", "-f", str(site), server=serve)
    try:
        read = tmp_path / "read.yaml"
        read.write_text(ok("get", "site", "edge-roundtrip", "-o", "yaml", server=serve))
        assert "status:" in read.read_text() and "creationTimestamp:" in read.read_text()
        assert yaml.safe_load(read.read_text())["metadata"]["annotations"] == {"owner": "team-x"}
        edited = tmp_path / "edited.yaml"
        edited.write_text(read.read_text().replace("cpu: 8", "cpu: 12"))
        assert ok("apply", "-f", str(edited), server=serve).strip() == "site/edge-roundtrip configured"
        stale = cli("apply", "-f", str(read), server_url=serve.url)  # the copy read before that change
        assert stale.returncode == 1 and "was changed by someone else" in stale.stderr, stale
        assert json.loads(ok("get", "site", "edge-roundtrip", "-o", "json", server=serve))["spec"]["capacity"]["cpu"] == 12
    finally:
        ok("delete", "site", "edge-roundtrip", server=serve)


def test_apply_from_stdin_and_delete_by_file(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    text = doc("Model", "cli-model", support.model_spec()) + "---\n" + doc("ModelDeployment", "cli-dep", support.deployment_spec("cli-model"))
    out = ok("apply", "-f", "-", server=serve, stdin=text)
    assert out.splitlines() == ["model/cli-model created", "modeldeployment/cli-dep created"]
    # deleting the model first is refused by the server ...
    refused = cli("delete", "model", "cli-model", server_url=serve.url)
    assert refused.returncode == 1 and refused.stderr.startswith("error: Model 'cli-model' is used by ModelDeployment cli-dep")
    # ... delete -f orders dependants first
    path = tmp_path / "both.yaml"
    path.write_text(text)
    out = ok("delete", "-f", str(path), server=serve)
    assert out.splitlines() == ["modeldeployment/cli-dep deleted", "model/cli-model deleted"]
    gone = cli("get", "model", "cli-model", server_url=serve.url)
    assert gone.returncode == 1 and "does not exist" in gone.stderr


def test_delete_site_abandoning_its_applications(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "site.yaml"
    path.write_text(doc("Site", "edge-abandoned", support.edge_site_spec()))
    ok("apply", "-f", str(path), server=serve)
    assert ok("delete", "site", "edge-abandoned", "--abandon-applications", server=serve).splitlines() == ["site/edge-abandoned deleted"]
    gone = cli("delete", "site", "edge-abandoned", "--abandon-applications", server_url=serve.url)
    assert gone.returncode == 1 and "no removal of its applications is pending" in gone.stderr, gone
    wrong = cli("delete", "model", "cli-model", "--abandon-applications", server_url=serve.url)
    assert wrong.returncode == 1 and "for a Site only" in wrong.stderr, wrong
    ok("apply", "-f", str(path), server=serve)
    kept = cli("delete", "site", "edge-abandoned", "--abandon-applications", "--keep-site", server_url=serve.url)
    assert kept.returncode == 1 and "left elsewhere is pending" in kept.stderr, kept  # an edge Site leaves none
    assert ok("get", "site", "edge-abandoned", server=serve)
    alone = cli("delete", "site", "edge-abandoned", "--keep-site", server_url=serve.url)
    assert alone.returncode == 2 and "goes with --abandon-applications" in alone.stderr, alone


def test_delete_by_file_is_one_bundle(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    text = "---\n".join([doc("Site", "edge-gone-1", support.edge_site_spec()), doc("Site", "edge-gone-2", support.edge_site_spec()),
                         doc("Model", "gone-model", support.model_spec()), doc("ModelDeployment", "gone-dep", support.deployment_spec("gone-model"))])
    path = tmp_path / "bundle.yaml"
    path.write_text(text)
    ok("apply", "-f", str(path), server=serve)
    assert ok("delete", "site", "edge-gone-2", server=serve).splitlines() == ["site/edge-gone-2 deleted"]
    # one object of the bundle is already gone: nothing is deleted, and the error says so
    refused = cli("delete", "-f", str(path), server_url=serve.url)
    assert refused.returncode == 1 and refused.stderr.strip() == "error: Site 'edge-gone-2' does not exist; nothing was deleted"
    for kind, name in (("site", "edge-gone-1"), ("model", "gone-model"), ("modeldeployment", "gone-dep")):
        assert cli("get", kind, name, server_url=serve.url).returncode == 0
    # a model still used by a deployment outside the bundle refuses the whole bundle
    partial = tmp_path / "partial.yaml"
    partial.write_text(doc("Site", "edge-gone-1", support.edge_site_spec()) + "---\n" + doc("Model", "gone-model", support.model_spec()))
    in_use = cli("delete", "-f", str(partial), server_url=serve.url)
    assert in_use.returncode == 1 and "used by ModelDeployment gone-dep" in in_use.stderr and "nothing was deleted" in in_use.stderr
    assert cli("get", "site", "edge-gone-1", server_url=serve.url).returncode == 0
    # skipping what is gone deletes the rest, dependants first
    out = ok("delete", "-f", str(path), "--ignore-not-found", server=serve)
    assert out.splitlines() == ["modeldeployment/gone-dep deleted", "model/gone-model deleted", "site/edge-gone-1 deleted"]
    assert ok("delete", "-f", str(path), "--ignore-not-found", server=serve).splitlines() == ["Nothing to delete."]


def test_apply_a_file_saved_with_a_bom_and_crlf(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "windows.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + doc("Site", "edge-bom", support.edge_site_spec()).replace("\n", "\r\n").encode())
    assert ok("apply", "-f", str(path), server=serve).splitlines() == ["site/edge-bom created"]
    assert ok("delete", "site", "edge-bom", server=serve).splitlines() == ["site/edge-bom deleted"]


def test_dry_run_changes_nothing(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    before = json.loads(ok("get", "sites", "-o", "json", server=serve))
    path = tmp_path / "s.yaml"
    path.write_text(doc("Site", "edge-lyon", {**support.edge_site_spec(), "capacity": {"cpu": 4, "memoryGiB": 8}}))
    out = ok("apply", "-f", str(path), "--dry-run", server=serve)
    assert out.splitlines()[0] == "site/edge-lyon configured (dry run)"
    assert json.loads(ok("get", "sites", "-o", "json", server=serve)) == before


def test_repeated_f_is_one_atomic_bundle(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    a, b, folder = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "more"
    folder.mkdir()
    a.write_text(doc("Model", "multi-model", support.model_spec()))
    b.write_text(doc("ModelDeployment", "multi-dep", support.deployment_spec("multi-model")))
    (folder / "c.yaml").write_text(doc("Site", "edge-multi", support.edge_site_spec()))
    everything = ["-f", str(a), "-f", str(b), "-f", str(folder), "-f", "-"]
    stdin = doc("Site", "edge-stdin", support.edge_site_spec())
    plan = ok("plan", *everything, server=serve, stdin=stdin).splitlines()
    assert plan[:4] == ["model/multi-model would be created", "modeldeployment/multi-dep would be created",
                        "site/edge-multi would be created", "site/edge-stdin would be created"], plan
    dry = ok("apply", *everything, "--dry-run", server=serve, stdin=stdin).splitlines()
    assert dry[:4] == ["model/multi-model created (dry run)", "modeldeployment/multi-dep created (dry run)",
                       "site/edge-multi created (dry run)", "site/edge-stdin created (dry run)"], dry
    assert cli("get", "model", "multi-model", server_url=serve.url).returncode == 1
    # a bad file anywhere in the bundle applies nothing, and is named
    bad = tmp_path / "bad.yaml"
    bad.write_text(doc("Site", "edge-bad", {**support.edge_site_spec(), "colour": "blue"}))
    refused = cli("apply", "-f", str(a), "-f", str(bad), server_url=serve.url)
    assert refused.returncode == 1 and str(bad) in refused.stderr, refused.stderr
    assert cli("get", "model", "multi-model", server_url=serve.url).returncode == 1
    out = ok("apply", *everything, server=serve, stdin=stdin).splitlines()
    assert out == ["model/multi-model created", "modeldeployment/multi-dep created", "site/edge-multi created", "site/edge-stdin created"]
    out = ok("delete", *everything, server=serve, stdin=stdin).splitlines()
    assert out == ["modeldeployment/multi-dep deleted", "model/multi-model deleted", "site/edge-multi deleted", "site/edge-stdin deleted"]
    assert cli("apply", "-f", "-", "-f", "-", server_url=serve.url, stdin="").returncode == 2


def test_plan_as_json_or_yaml_says_which_objects_would_change(serve: support.ServeProcess, applied, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """A script reads plan -o json to learn what an apply would change: an object changed
    with no replica moving (more CPU on a site) is a change all the same, as the table says."""
    path = tmp_path / "bigger.yaml"
    path.write_text(doc("Site", "edge-lyon", {**support.edge_site_spec(), "capacity": {"cpu": 12, "memoryGiB": 48}}) + "---\n"
                    + doc("Site", "edge-plan-new", support.edge_site_spec()))
    table = ok("plan", "-f", str(path), server=serve).splitlines()
    assert table[:2] == ["site/edge-lyon would be configured", "site/edge-plan-new would be created"], table
    for fmt, parse in (("json", json.loads), ("yaml", yaml.safe_load)):
        plan = parse(ok("plan", "-f", str(path), "-o", fmt, server=serve))
        assert [(r["kind"], r["name"], r["action"]) for r in plan["results"]] == [
            ("Site", "edge-lyon", "configured"), ("Site", "edge-plan-new", "created")], plan
        assert {"changes", "deployments"} <= plan.keys(), plan  # the replica plan as before
    assert cli("get", "site", "edge-plan-new", server_url=serve.url).returncode == 1  # plan applied nothing


def test_exit_code_says_whether_the_plan_changes_anything(serve: support.ServeProcess, applied, offline_fleet: pathlib.Path,  # type: ignore[no-untyped-def]
                                                         tmp_path: pathlib.Path) -> None:
    """A CI pipeline asks plan (or apply --dry-run) whether an apply would change anything:
    with --exit-code, 0 says nothing would and 4 that something would, the plan printed
    all the same; without it, 0 either way, as before."""
    path = tmp_path / "bigger.yaml"
    path.write_text(doc("Site", "edge-lyon", {**support.edge_site_spec(), "capacity": {"cpu": 12, "memoryGiB": 48}}))
    for argv in (["plan"], ["apply", "--dry-run"], ["plan", "-o", "json"], ["apply", "--dry-run", "-o", "yaml"]):
        same = cli(*argv, "-f", str(offline_fleet), "--exit-code", server_url=serve.url)
        assert same.returncode == 0 and same.stderr == "" and same.stdout, same
        changed = cli(*argv, "-f", str(path), "--exit-code", server_url=serve.url)
        assert changed.returncode == 4 and changed.stderr == "" and "edge-lyon" in changed.stdout, changed
        assert cli(*argv, "-f", str(path), server_url=serve.url).returncode == 0
    assert json.loads(ok("get", "site", "edge-lyon", "-o", "json", server=serve))["spec"]["capacity"]["cpu"] != 12
    # an error keeps its own code: never read as "no change" nor as "changes"
    refused = cli("plan", "-f", str(tmp_path / "missing.yaml"), "--exit-code", server_url=serve.url)
    assert refused.returncode == 2, refused
    dead = cli("plan", "-f", str(path), "--exit-code", server_url=f"http://127.0.0.1:{support.closed_port()}")
    assert dead.returncode == 3, dead
    # a real apply changes what it changes: the flag is a dry run's
    alone = cli("apply", "-f", str(path), "--exit-code", server_url=serve.url)
    assert alone.returncode == 2 and alone.stderr.strip() == "error: --exit-code goes with --dry-run (or plan)", alone


def test_plan_says_data_centres_out_of_reach_are_out_of_reach(offline_fleet: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The example fleet's data centres do not answer (their Ray at a closed port): plan
    said "all 2 healthy matching EU datacenter sites are cordoned" of data centres nobody
    cordoned. It says they are out of reach, and since when. (The control plane declares
    them lost only after 300 s × 100 here, so they stay out of reach, not lost, throughout.)"""
    serve = support.ServeProcess(tmp_path / "data", *support.DATA_CENTRES_NEVER_LOST, artifact_root=offline_fleet).wait_ready()
    try:
        ok("apply", "-f", str(offline_fleet), server=serve)
        health = serve.wait_data_centres_observed()
        assert set(health) == {"dc-frankfurt", "dc-paris"} and set(health.values()) == {"Unreachable"}, health
        plan = json.loads(ok("plan", "-f", str(offline_fleet), "-o", "json", server=serve))
        table = ok("plan", "-f", str(offline_fleet), server=serve)
    finally:
        serve.stop()
    reason = next(d["reason"] for d in plan["deployments"] if d["name"] == "assistant-dc")
    since = r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(rf"all 2 matching EU datacenter sites are out of reach \(dc-frankfurt {since}, dc-paris {since}\); "
                        r"a site out of reach takes no new deployment until it answers; 0 of 1 placed", reason), reason
    assert "cordoned" not in table and "out of reach" in table, table
