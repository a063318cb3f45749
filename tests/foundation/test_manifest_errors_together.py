"""One apply reports every error at once: a document's own errors do not hide the
reference errors of the others, and a reference to a document refused for its own
errors is not reported as missing.

Table cases run at the catalog level (the check the API runs, with the stored Models
given); then the same through the real HTTP API and the real CLI (``apply -f``,
``plan -f``, ``apply --dry-run``), where nothing may be applied.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from orchestrator import catalog
from orchestrator.cli import main as cli_main
from orchestrator.manifests import loader, schema
from orchestrator.manifests.errors import ManifestError, ManifestIssue

from . import support
from .support import doc, join, line_of

SITE = doc("Site", "s1", support.edge_site_spec())
SITE_UNKNOWN_FIELD = doc("Site", "s1", {**support.edge_site_spec(), "colour": "red"})
MODEL = doc("Model", "m", support.model_spec())
BROKEN_MODEL = doc("Model", "broken", {"variants": []})
DUP_KEY_MODEL = doc("Model", "broken", support.model_spec()).replace("  - name: small\n", "  - name: small\n    name: tiny\n")


def deployment(name: str, model: str, variant: str = "small", **spec: Any) -> str:
    return doc("ModelDeployment", name, {**support.deployment_spec(model), "variant": variant, **spec})


@dataclass(frozen=True)
class Expect:
    file: str
    document: int
    field: str
    needle: str  # the (first) line holding it is the line the issue must name
    message: str


@dataclass(frozen=True)
class Case:
    id: str
    files: list[tuple[str, str]]
    expected: list[Expect]
    stored: tuple[str, ...] = ()  # Model documents already applied


CASES = [
    Case("schema-error-does-not-hide-a-missing-model",
         [("a.yaml", join(SITE_UNKNOWN_FIELD, MODEL, deployment("d", "nope")))],
         [Expect("a.yaml", 0, "spec.colour", "colour:", "unknown field 'colour'"),
          Expect("a.yaml", 2, "spec.model", "model: nope", "Model 'nope' does not exist (known models: m)")]),
    Case("schema-error-does-not-hide-a-missing-variant-in-another-file",
         [("a.yaml", SITE_UNKNOWN_FIELD), ("b.yaml", join(MODEL, deployment("d", "m", "tiny")))],
         [Expect("a.yaml", 0, "spec.colour", "colour:", "unknown field 'colour'"),
          Expect("b.yaml", 1, "spec.variant", "variant: tiny", "Model 'm' has no variant 'tiny' (has: small, big)")]),
    Case("a-reference-error-before-a-schema-error-comes-first",
         [("a.yaml", join(MODEL, deployment("d", "m", "tiny"), SITE_UNKNOWN_FIELD))],
         [Expect("a.yaml", 1, "spec.variant", "variant: tiny", "has no variant 'tiny'"),
          Expect("a.yaml", 2, "spec.colour", "colour:", "unknown field 'colour'")]),
    Case("a-deployment-naming-a-refused-model-is-not-told-it-is-missing",
         [("a.yaml", join(BROKEN_MODEL, deployment("d", "broken")))],
         [Expect("a.yaml", 0, "spec.variants", "variants:", "at least 1 item")]),
    Case("a-refused-model-in-another-file",
         [("a.yaml", deployment("d", "broken", "tiny")), ("b.yaml", BROKEN_MODEL)],
         [Expect("b.yaml", 0, "spec.variants", "variants:", "at least 1 item")]),
    Case("a-refused-model-is-among-the-known-models",
         [("a.yaml", join(BROKEN_MODEL, deployment("d", "nope")))],
         [Expect("a.yaml", 0, "spec.variants", "variants:", "at least 1 item"),
          Expect("a.yaml", 1, "spec.model", "model: nope", "Model 'nope' does not exist (known models: broken)")]),
    Case("a-duplicate-key-spoils-its-own-document-only",
         [("a.yaml", join(DUP_KEY_MODEL, deployment("d", "broken"), deployment("e", "nope"), SITE_UNKNOWN_FIELD))],
         [Expect("a.yaml", 0, "spec.variants[0].name", "name: tiny", "duplicate key 'name'"),
          Expect("a.yaml", 2, "spec.model", "model: nope", "Model 'nope' does not exist"),
          Expect("a.yaml", 3, "spec.colour", "colour:", "unknown field 'colour'")]),
    Case("a-refused-deployment-is-not-judged-and-hides-nothing",
         [("a.yaml", join(MODEL, deployment("d", "m", replicas={"min": 5, "max": 2}), deployment("e", "m", "tiny")))],
         [Expect("a.yaml", 1, "spec.replicas", "replicas:", "min (5) is greater than max (2)"),
          Expect("a.yaml", 2, "spec.variant", "variant: tiny", "has no variant 'tiny'")]),
    Case("defined-twice-when-one-copy-is-refused",
         [("a.yaml", SITE_UNKNOWN_FIELD), ("b.yaml", SITE)],
         [Expect("a.yaml", 0, "spec.colour", "colour:", "unknown field 'colour'"),
          Expect("b.yaml", 0, "metadata.name", "name: s1", "Site 's1' is defined twice (also a.yaml document 0)")]),
    Case("a-bad-resource-version-and-a-reference-error",
         [("a.yaml", join(doc("Site", "s1", support.edge_site_spec(), resourceVersion="abc"), deployment("d", "nope")))],
         [Expect("a.yaml", 0, "metadata.resourceVersion", "resourceVersion:", "must be a number as returned by get"),
          Expect("a.yaml", 1, "spec.model", "model: nope", "does not exist")]),
    Case("a-stored-model-is-checked-beside-schema-errors",
         [("a.yaml", join(SITE_UNKNOWN_FIELD, deployment("d", "m", "tiny")))],
         [Expect("a.yaml", 0, "spec.colour", "colour:", "unknown field 'colour'"),
          Expect("a.yaml", 1, "spec.variant", "variant: tiny", "Model 'm' has no variant 'tiny'")],
         stored=(MODEL,)),
    Case("a-stored-model-refused-in-the-request-is-not-judged-by-its-old-spec",
         [("a.yaml", join(doc("Model", "m", {"variants": []}), deployment("d", "m", "tiny")))],
         [Expect("a.yaml", 0, "spec.variants", "variants:", "at least 1 item")],
         stored=(MODEL,)),
    Case("past-malformed-yaml-references-are-not-judged",
         [("a.yaml", join(SITE_UNKNOWN_FIELD, deployment("d", "defined-further-down"),
                          "apiVersion: x\nkind: Model\n bad: indentation\n"))],
         [Expect("a.yaml", 0, "spec.colour", "colour:", "unknown field 'colour'"),
          Expect("a.yaml", 2, "", " bad: indentation", "malformed YAML")]),
]


def expected_issues(case: Case) -> list[tuple[str, int, str, int]]:
    texts = dict(case.files)
    return [(e.file, e.document, e.field, line_of(texts[e.file], e.needle)) for e in case.expected]


def stored_models(case: Case) -> dict[str, schema.ModelSpec]:
    return {d.name: d.doc.spec for text in case.stored for d in loader.load_text(text)}  # type: ignore[misc]


def assert_reports(issues: list[ManifestIssue], case: Case) -> None:
    assert [(i.file, i.document, i.field, i.line) for i in issues] == expected_issues(case), [str(i) for i in issues]
    for issue, e in zip(issues, case.expected):
        assert e.message in issue.message, str(issue)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_error_of_one_apply_is_reported_together(case: Case) -> None:
    reading = loader.read_text(loader.bundle(case.files), "<request>")
    assert_reports(catalog.check(reading, stored_models(case)), case)


@pytest.mark.parametrize("case", [c for c in CASES if len(c.files) == 1], ids=[c.id for c in CASES if len(c.files) == 1])
def test_a_single_file_reports_the_same(case: Case) -> None:
    (name, text), = case.files
    assert_reports(catalog.check(loader.read_text(text, name), stored_models(case)), case)


def test_load_text_still_refuses_with_every_issue_of_each_document() -> None:
    """What reads files for other commands (simulate) keeps raising, now with every issue."""
    with pytest.raises(ManifestError) as caught:
        loader.load_text(join(DUP_KEY_MODEL, SITE_UNKNOWN_FIELD), "a.yaml")
    assert [(i.document, i.field) for i in caught.value.issues] == [(0, "spec.variants[0].name"), (1, "spec.colour")]


def test_issues_stay_in_file_then_document_order_in_a_large_bundle() -> None:
    """Every fifth Site refused, every deployment naming a missing variant: all reported, in order."""
    files = []
    for f in range(4):
        docs = [SITE_UNKNOWN_FIELD.replace("s1", f"s{f}-{i}") if i % 5 == 0 else SITE.replace("s1", f"s{f}-{i}") for i in range(100)]
        docs += [MODEL.replace("name: m\n", f"name: m{f}\n")] + [deployment(f"d{f}-{i}", f"m{f}", "tiny") for i in range(99)]
        files.append((f"f{f}.yaml", join(*docs)))
    issues = catalog.check(loader.read_text(loader.bundle(files), "<request>"), {})
    assert len(issues) == 4 * (20 + 99)
    assert [(i.file, i.document) for i in issues] == sorted((i.file, i.document) for i in issues)  # type: ignore[type-var]
    assert {i.field for i in issues} == {"spec.colour", "spec.variant"}


# --- through the real API and the real CLI -------------------------------------------------


@pytest.fixture(scope="module")
def seeded(control_plane: support.ServerThread) -> support.ServerThread:
    """The module's control plane holding Model m, so references to stored objects count."""
    r = httpx.post(f"{control_plane.url}/v1/apply", content=MODEL, timeout=30)
    assert r.status_code == 200, r.text
    return control_plane


@pytest.fixture(autouse=True)
def no_edgeplane_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EDGEPLANE_")]:
        monkeypatch.delenv(key)


API_CASES = [c for c in CASES if c.stored == (MODEL,) or c.id in {
    "schema-error-does-not-hide-a-missing-variant-in-another-file", "a-deployment-naming-a-refused-model-is-not-told-it-is-missing",
    "a-duplicate-key-spoils-its-own-document-only", "defined-twice-when-one-copy-is-refused"}]


@pytest.mark.parametrize("dry_run", ["false", "true"])
@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_reports_every_error_and_applies_nothing(seeded: support.ServerThread, case: Case, dry_run: str) -> None:
    assert seeded.cp is not None
    store = seeded.cp.store
    before_version, before_events, before_objects = store.resource_version(), support.user_events(store), support.desired_state(store)
    r = httpx.post(f"{seeded.url}/v1/apply", params={"dryRun": dry_run}, content=loader.bundle(case.files), timeout=30)
    assert r.status_code == 422, r.text
    assert f"{len(case.expected)} problem(s) in the manifests; nothing was applied" == r.json()["error"]
    assert_reports([ManifestIssue(**i) for i in r.json()["issues"]], case)
    assert store.resource_version() == before_version
    assert support.user_events(store) == before_events
    assert support.desired_state(store) == before_objects


@pytest.mark.parametrize(("body", "file", "said"), [
    (SITE_UNKNOWN_FIELD, None, "1 problem(s) in the manifests; nothing was applied"),  # every document refused
    ("---\n# nothing here\n", None, "the request holds no documents"),
    # the files that hold nothing are named, as the CLI sends them or as ?file= names the body
    ("# nothing here\n", "x.yaml", "x.yaml holds no documents"),
    (loader.bundle([("dir/a.yaml", "# nothing here\n")]), None, "dir/a.yaml holds no documents"),
    (loader.bundle([("a.yaml", "# nothing here\n"), ("b.yaml", "")]), None, "a.yaml and b.yaml hold no documents"),
    (loader.bundle([(f"{n}.yaml", "---\n") for n in "abcde"]), None, "a.yaml, b.yaml, c.yaml and 2 more files hold no documents"),
])
@pytest.mark.parametrize("route", ["apply", "apply?dryRun=true", "delete"])
def test_api_tells_a_body_of_refused_documents_from_an_empty_one(seeded: support.ServerThread, body: str, file: str | None,
                                                                 said: str, route: str) -> None:
    r = httpx.post(f"{seeded.url}/v1/{route}", params={"file": file} if file else {}, content=body, timeout=30)
    if route == "delete":  # a delete refused deletes nothing, and says so
        said = said.replace("nothing was applied", "nothing was deleted")
    assert r.status_code == 422 and r.json()["error"] == said, r.text


CLI_CASE = next(c for c in CASES if c.id == "schema-error-does-not-hide-a-missing-variant-in-another-file")


@pytest.mark.parametrize("command", [["apply"], ["plan"], ["apply", "--dry-run"]], ids=["apply", "plan", "apply-dry-run"])
def test_cli_prints_every_error_and_applies_nothing(seeded: support.ServerThread, tmp_path: pathlib.Path, command: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert seeded.cp is not None
    before = seeded.cp.store.resource_version()
    args: list[str] = []
    for name, text in CLI_CASE.files:
        (tmp_path / name).write_text(text)
        args += ["-f", str(tmp_path / name)]
    assert cli_main.main(["--server", seeded.url, *command, *args]) == 1
    out = capsys.readouterr()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert out.err.splitlines() == [
        "error: 2 problem(s) in the manifests; nothing was applied",
        f"  {a}:{line_of(SITE_UNKNOWN_FIELD, 'colour:')} (document 0): spec.colour: unknown field 'colour'",
        f"  {b}:{line_of(CLI_CASE.files[1][1], 'variant: tiny')} (document 1): spec.variant: "
        "Model 'm' has no variant 'tiny' (has: small, big)"]
    assert out.out == ""
    assert seeded.cp.store.resource_version() == before


def test_cli_directory_reports_every_file(seeded: support.ServerThread, tmp_path: pathlib.Path) -> None:
    """A directory is one bundle: the installed command names each file's error."""
    for name, text in [("a.yaml", join(BROKEN_MODEL, deployment("d", "broken"))), ("b.yaml", deployment("e", "nope"))]:
        (tmp_path / name).write_text(text)
    proc = support.cli("apply", "-f", str(tmp_path), server_url=seeded.url)
    assert proc.returncode == 1, proc
    assert [line.split(": ", 2)[1] for line in proc.stderr.splitlines()[1:]] == ["spec.variants", "spec.model"], proc.stderr
    assert str(tmp_path / "a.yaml") in proc.stderr.splitlines()[1] and str(tmp_path / "b.yaml") in proc.stderr.splitlines()[2]
    assert "Model 'broken' does not exist" not in proc.stderr


# --- the same entry twice in a placement list ------------------------------------------------


@pytest.mark.parametrize(("placement", "said"), [
    ({"tiers": ["edge", "datacenter", "edge"]}, "spec.placement.tiers: edge is listed more than once: give each tier once"),
    ({"tiers": ["edge", "edge", "datacenter", "datacenter"]},
     "spec.placement.tiers: datacenter and edge is listed more than once: give each tier once"),
    ({"residency": ["FR", "DE", "FR"]}, "spec.placement.residency: FR is listed more than once: give each code once"),
    ({"residency": ["EU", "EU"]}, "spec.placement.residency: EU is listed more than once: give each code once"),
])
def test_a_placement_list_naming_an_entry_twice_is_refused(placement: dict[str, Any], said: str) -> None:
    text = join(MODEL, deployment("d", "m", placement=placement))
    issues = catalog.check(loader.read_text(text, "d.yaml"), {})
    field = said.split(":", 1)[0]
    assert [str(i) for i in issues] == [f"d.yaml:{line_of(text, field.rsplit('.', 1)[1] + ':')} (document 1): {said}"]


@pytest.mark.parametrize("placement", [{"residency": ["EU", "FR"]}, {"residency": ["FR", "DE"]}, {"tiers": ["edge", "datacenter"]}])
def test_an_overlap_is_not_a_repeat(placement: dict[str, Any]) -> None:
    docs = loader.load_text(join(MODEL, deployment("d", "m", placement=placement)), "d.yaml")
    assert catalog.check(loader.Reading.of(docs), {}) == []


@pytest.mark.parametrize("placement", [{"residency": ["FR", "FR"]}, {"tiers": ["edge", "edge"]}])
def test_a_stored_placement_with_a_repeat_still_reads(placement: dict[str, Any]) -> None:
    """Earlier versions stored such lists: the reconciler reads stored specs and must not stop on one."""
    spec = schema.ModelDeploymentSpec.model_validate({"model": "m", "placement": placement})
    assert spec.placement.model_dump(include=set(placement)) == placement
