"""The bad manifests of ``test_bad_manifests.py``, a representative subset, through the real
HTTP API and the real CLI: each is refused naming its file, document, field and line, and
nothing is applied, not even a good document sent with it. Also what the CLI refuses before
it asks the control plane (files of no documents, a file that is not UTF-8).
"""

from __future__ import annotations

import pathlib

import httpx
import pytest

from orchestrator.manifests.errors import ManifestIssue

from . import support
from .support import doc
from .test_bad_manifests import BAD, GOOD_SITE, Bad, assert_names

SUBSET = [c for c in BAD if c.id in {
    "yaml-bad-indentation", "yaml-duplicate-key", "yaml-alias-bomb", "yaml-deep-nesting", "yaml-tag-that-does-not-fit",
    "not-utf8", "unknown-kind", "missing-kind",
    "unknown-resources-field", "bad-country", "bad-residency", "duplicate-names-in-file", "missing-model", "ray-serve-at-the-edge",
    "min-greater-than-max", "datacenter-without-runtime", "uri-dot-dot", "uri-nul-in-file-path", "uri-unparsable-host", "error-in-second-document", "json-unknown-field",
    "tier-listed-twice", "residency-listed-twice", "lone-surrogate-in-annotation", "lone-surrogate-in-region", "binary-in-args",
    "nan-in-args", "cpu-as-a-kubernetes-quantity",
}]


@pytest.fixture(scope="module")
def seeded(control_plane: support.ServerThread) -> support.ServerThread:
    """The module's control plane holding one good object, so 'nothing new' is visible."""
    r = httpx.post(f"{control_plane.url}/v1/apply", content=doc("Site", "seed", support.edge_site_spec()), timeout=30)
    assert r.status_code == 200, r.text
    return control_plane


@pytest.mark.parametrize("case", SUBSET, ids=[c.id for c in SUBSET])
def test_api_refuses_bad_manifest_and_applies_nothing(seeded: support.ServerThread, case: Bad) -> None:
    assert seeded.cp is not None
    store = seeded.cp.store
    before_version, before_events, before_objects = store.resource_version(), support.user_events(store), support.desired_state(store)
    # a good document in the same request must not be applied either
    body = case.text if isinstance(case.text, bytes) else case.text + "\n---\n" + doc("Site", "innocent", support.edge_site_spec())
    r = httpx.post(f"{seeded.url}/v1/apply", params={"file": "bad.yaml"}, content=body, timeout=30)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert "nothing was applied" in payload["error"]
    issues = [ManifestIssue(**i) for i in payload["issues"]]
    assert_names(issues, case, "bad.yaml")
    assert store.resource_version() == before_version
    assert support.user_events(store) == before_events
    assert support.desired_state(store) == before_objects
    assert httpx.get(f"{seeded.url}/v1/sites/innocent", timeout=10).status_code == 404
    assert [o["metadata"]["name"] for o in httpx.get(f"{seeded.url}/v1/sites", timeout=10).json()["items"]] == ["seed"]


CLI_SUBSET = [c for c in SUBSET if c.id in {"yaml-duplicate-key", "yaml-tag-that-does-not-fit", "bad-residency", "missing-model",
                                            "error-in-second-document"}]


@pytest.mark.parametrize("case", CLI_SUBSET, ids=[c.id for c in CLI_SUBSET])
def test_cli_refuses_bad_manifest(seeded: support.ServerThread, case: Bad, tmp_path: pathlib.Path) -> None:
    assert seeded.cp is not None
    before = seeded.cp.store.resource_version()
    path = tmp_path / "bad.yaml"
    path.write_text(case.text)  # type: ignore[arg-type]
    proc = support.cli("apply", "-f", str(path), server_url=seeded.url)
    assert proc.returncode == 1, proc
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: ") and "nothing was applied" in lines[0], proc.stderr
    expected = f"{path}:{case.expected_line()} (document {case.document}): {case.field}:"
    assert any(line.strip().startswith(expected) for line in lines[1:]), (expected, proc.stderr)
    assert proc.stdout == ""
    assert seeded.cp.store.resource_version() == before


@pytest.mark.parametrize("command", [["apply"], ["plan"], ["apply", "--dry-run"], ["delete"]])
def test_cli_names_the_files_that_hold_no_documents(seeded: support.ServerThread, tmp_path: pathlib.Path, command: list[str]) -> None:
    (tmp_path / "comments.yaml").write_text("# the fleet, to come\n---\n")
    (tmp_path / "empty.yaml").write_text("")
    proc = support.cli(*command, "-f", str(tmp_path / "comments.yaml"), "-f", str(tmp_path / "empty.yaml"), server_url=seeded.url)
    assert (proc.returncode, proc.stdout) == (1, ""), proc
    assert proc.stderr == f"error: {tmp_path / 'comments.yaml'} and {tmp_path / 'empty.yaml'} hold no documents\n"


def test_cli_refuses_non_utf8_file_locally(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD_SITE.replace("s1", "s1-caf\xe9").encode("latin-1"))
    # nothing listens there: the file is refused before any connection is tried
    proc = support.cli("apply", "-f", str(path), server_url=f"http://127.0.0.1:{support.closed_port()}")
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith(f"error: {path}: not UTF-8 text"), proc.stderr
