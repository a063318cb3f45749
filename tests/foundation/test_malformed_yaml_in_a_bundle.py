"""Malformed YAML spoils the document it is in, never the files after it.

A directory given to ``apply -f`` is one bundle; each of its files is read on its own, so
a syntax error in the first file (a bad indent, a tab, an unclosed quote or bracket, a
control character) is reported at its own file:line and the later files are still read
and checked. Within one file, reading goes on at the next ``---`` line. Nothing is applied
while any file has an error. The limits of one apply (documents, bytes) name the file
where they are passed.

Table cases run at the loader level; then the same through the real CLI against a real
control plane, where nothing may be applied.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

import pytest

from orchestrator import catalog
from orchestrator.cli import main as cli_main
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestIssue

from . import support
from .support import API_VERSION, doc, join, line_of

H = f"apiVersion: {API_VERSION}\n"
SITE = doc("Site", "s1", support.edge_site_spec())
SITE_UNKNOWN_FIELD = doc("Site", "s3", {**support.edge_site_spec(), "colour": "red"})


def site(name: str) -> str:
    return SITE.replace("name: s1", f"name: {name}")


#: the first file of each case: (its text, what the error's line holds, or the line's number
#: where PyYAML finds the error at the end of the text, past its last line; an excerpt of the
#: message, which then names the line the unclosed quote or bracket opens at)
MALFORMED = {
    "bad-indentation": (H + "kind: Site\nmetadata:\n  name: a1\n bad: indentation\nspec: {}\n", " bad: indentation",
                        "malformed YAML"),
    "tab": (site("a1").replace("  location:\n", "\tlocation: x\n  location:\n"), "\tlocation", "malformed YAML"),
    "unclosed-quote": (H + 'kind: Site\nmetadata:\n  name: "a1\nspec: {}\n', 6, "(while scanning a quoted scalar at line 4)"),
    "unclosed-bracket": (H + "kind: Site\nmetadata: {name: a1\nspec: {}\n", "spec: {}", "(while parsing a flow mapping at line 3)"),
    "unclosed-json": ('{"apiVersion": "edgeplane.io/v1alpha1", "kind": "Site",\n', 2, "malformed YAML"),
    "control-character": (site("a1").replace("  tier: edge\n", "  tier: ed\x07ge\n"), "  tier: ed", "unacceptable character #x0007"),
    "absurd-nesting": (H + "kind: Site\nmetadata:\n  name: a1\nspec:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", "  x: [[[",
                       "nested deeper than 32 levels"),
}


def expected_line(text: str, where: str | int) -> int:
    return where if isinstance(where, int) else line_of(text, where)


def check(files: list[tuple[str, str]]) -> tuple[loader.Reading, list[ManifestIssue]]:
    reading = loader.read_text(loader.bundle(files), "<request>")
    return reading, catalog.check(reading, {})


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_syntax_error_in_the_first_file_does_not_hide_the_others(case: str) -> None:
    """The first file is malformed, the second valid, the third has a schema error: both
    errors are reported, each at its own file:line, and the second file is read."""
    text, where, message = MALFORMED[case]
    files = [("dir/a.yaml", text), ("dir/b.yaml", site("s2")), ("dir/c.yaml", join(site("s4"), SITE_UNKNOWN_FIELD))]
    reading, issues = check(files)
    assert [(i.file, i.document, i.field, i.line) for i in issues] == [
        ("dir/a.yaml", 0, "", expected_line(text, where)),
        ("dir/c.yaml", 1, "spec.colour", line_of(files[2][1], "colour:"))], [str(i) for i in issues]
    assert message in issues[0].message, str(issues[0])
    assert "unknown field 'colour'" in issues[1].message
    assert [(d.file, d.index, d.line, d.name) for d in reading.documents] == [
        ("dir/b.yaml", 0, 1, "s2"), ("dir/c.yaml", 0, 1, "s4")]
    assert not reading.complete  # the malformed document may have defined anything: references are not judged


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_file_goes_on_at_the_next_document_after_a_syntax_error(case: str) -> None:
    """The same malformed document as the second of three in one file: the third is still
    read and checked, with its own index and line, alone and as the second file of a bundle."""
    bad, where, _ = MALFORMED[case]
    text = join(site("s1"), bad, SITE_UNKNOWN_FIELD, site("s5"))
    bad_at = len(site("s1").splitlines()) + 2  # after the first document and its '---'
    third_at = bad_at + len(bad.splitlines()) + 1
    expected = [(1, "", bad_at + expected_line(bad, where) - 1), (2, "spec.colour", third_at + line_of(SITE_UNKNOWN_FIELD, "colour:") - 1)]
    for reading in (loader.read_text(text, "x.yaml"), loader.read_text(loader.bundle([("w.yaml", site("w")), ("x.yaml", text)]))):
        issues = [i for i in catalog.check(reading, {}) if i.file == "x.yaml"]
        assert [(i.document, i.field, i.line) for i in issues] == expected, [str(i) for i in issues]
        assert [(d.index, d.name) for d in reading.documents if d.file == "x.yaml"] == [(0, "s1"), (3, "s5")]


def test_every_malformed_document_of_a_file_is_reported() -> None:
    text = join(MALFORMED["tab"][0], site("s2"), MALFORMED["unclosed-bracket"][0], MALFORMED["bad-indentation"][0], site("s3"))
    reading = loader.read_text(text, "x.yaml")
    assert [(i.document, i.message.split(":")[0]) for i in reading.issues] == [(0, "malformed YAML"), (2, "malformed YAML"),
                                                                             (3, "malformed YAML")]
    assert [(d.index, d.name, d.line) for d in reading.documents] == [(1, "s2", line_of(text, "name: s2") - 3),
                                                                       (4, "s3", line_of(text, "name: s3") - 3)]


def test_an_unclosed_quote_ends_at_the_next_document() -> None:
    """PyYAML ends a quoted string at a '---' line: what follows is the next document."""
    text = H + 'kind: Site\nmetadata:\n  name: "a1\n---\n' + site("s2")
    reading = loader.read_text(text, "x.yaml")
    assert [(i.document, i.line) for i in reading.issues] == [(0, 5)]
    assert "document separator" in reading.issues[0].message
    assert [(d.index, d.name, d.line) for d in reading.documents] == [(1, "s2", 6)]


def test_text_after_a_document_with_no_separator_is_that_documents_error() -> None:
    """A JSON object closed twice: the error is the object's, and what follows is read."""
    obj = json.dumps({"apiVersion": API_VERSION, "kind": "Site", "metadata": {"name": "j1"}, "spec": support.edge_site_spec()}, indent=1)
    text = obj + "\n}\n---\n" + site("s2")
    reading = loader.read_text(text, "x.json")
    assert [(i.document, i.line) for i in reading.issues] == [(0, len(obj.splitlines()) + 1)], [str(i) for i in reading.issues]
    assert "expected '<document start>', but found '}'" in reading.issues[0].message
    assert [(d.index, d.name) for d in reading.documents] == [(0, "j1"), (1, "s2")]


def test_crlf_line_ends_keep_their_lines_after_a_syntax_error() -> None:
    bad = MALFORMED["bad-indentation"][0]
    text = join(site("s1"), bad, SITE_UNKNOWN_FIELD).replace("\n", "\r\n")
    reading = loader.read_text(loader.bundle([("w.yaml", site("w")), ("x.yaml", text)]))
    bad_at = len(site("s1").splitlines()) + 2
    assert [(i.file, i.document, i.line) for i in catalog.check(reading, {})] == [
        ("x.yaml", 1, bad_at + line_of(bad, " bad: indentation") - 1), ("x.yaml", 2, line_of(text, "colour:"))]


def test_a_valid_bundle_reads_as_before() -> None:
    files = [("a.yaml", join(site("s1"), site("s2"))), ("b.yaml", "---\n" + site("s3") + "---\n"), ("c.json", '[{"apiVersion": "'
             + API_VERSION + '", "kind": "Site", "metadata": {"name": "s4"}, "spec": {"tier": "edge", "location": '
             '{"country": "FR", "lat": 1, "lon": 2}}}]')]
    reading = loader.read_text(loader.bundle(files), "<request>")
    assert reading.issues == [] and reading.complete
    assert [(d.file, d.index, d.line, d.name) for d in reading.documents] == [
        ("a.yaml", 0, 1, "s1"), ("a.yaml", 1, line_of(files[0][1], "name: s2") - 3, "s2"), ("b.yaml", 0, 2, "s3"), ("c.json", 0, 1, "s4")]


# --- the limits of one apply -------------------------------------------------------------


def many_sites(prefix: str, n: int) -> str:
    return "---\n".join(f"{H}kind: Site\nmetadata: {{name: {prefix}-{i}}}\nspec: {{tier: edge, location: {{country: FR, lat: 1, lon: 2}}}}\n"
                        for i in range(n))


def test_the_document_limit_of_one_apply_names_the_file_that_passes_it() -> None:
    files = [("a.yaml", many_sites("a", 400)), ("b.yaml", many_sites("b", 400)), ("c.yaml", many_sites("c", 400))]
    reading = loader.read_text(loader.bundle(files), "<request>")
    assert [(i.file, i.document, i.line, i.message) for i in reading.issues] == [
        ("c.yaml", None, line_of(files[2][1], "name: c-200") - 2,  # where that document starts
         f"more than {loader.MAX_DOCUMENTS} documents in one apply, 800 in the files before this one: apply the files in smaller groups")]
    assert len(reading.documents) == 1000 and not reading.complete


def test_the_document_limit_of_one_file_says_so() -> None:
    files = [("a.yaml", many_sites("a", 1001)), ("b.yaml", SITE)]
    [issue] = loader.read_text(loader.bundle(files), "<request>").issues
    assert (issue.file, issue.line, issue.message) == ("a.yaml", line_of(files[0][1], "name: a-1000") - 2,
                                                       f"more than {loader.MAX_DOCUMENTS} documents in one file")


def big(name: str, mib: float) -> str:
    return site(name) + ("#" + "x" * 1023 + "\n") * int(mib * 1024)


def test_the_size_limit_of_one_apply_names_the_file_that_passes_it() -> None:
    files = [("a.yaml", big("a", 1.5)), ("b.yaml", big("b", 1.5)), ("c.yaml", big("c", 1.5))]
    said = "with the 2 file(s) before it, this file passes 4 MiB, the most one apply reads: apply the files in smaller groups"
    assert loader.size_issue(loader.bundle(files).encode()) == ManifestIssue("c.yaml", None, "", None, said)
    assert loader.read_text(loader.bundle(files), "<request>").issues == [ManifestIssue("c.yaml", None, "", None, said)]
    assert loader.size_issue(loader.bundle(files[:2])) is None
    assert loader.size_issue(loader.bundle([("a.yaml", big("a", 4.5)), ("b.yaml", SITE)])) == ManifestIssue(
        "a.yaml", None, "", None, "file is larger than 4 MiB")
    assert loader.size_issue(big("a", 4.5), "a.yaml") == ManifestIssue("a.yaml", None, "", None, "file is larger than 4 MiB")


def test_cli_refuses_a_directory_larger_than_one_apply_naming_the_file(tmp_path: pathlib.Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.yaml").write_text(big(name, 1.5))
    # nothing listens there: the directory is refused before any connection is tried
    proc = support.cli("apply", "-f", str(tmp_path), server_url=f"http://127.0.0.1:{support.closed_port()}")
    assert proc.returncode == 1, proc
    assert proc.stderr.splitlines() == ["error: 1 problem(s) in the manifests",
                                        f"  {tmp_path / 'c.yaml'}: with the 2 file(s) before it, this file passes 4 MiB, "
                                        "the most one apply reads: apply the files in smaller groups"], proc.stderr


# --- through the real CLI and a real control plane -----------------------------------------


@pytest.fixture(autouse=True)
def no_edgeplane_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EDGEPLANE_")]:
        monkeypatch.delenv(key)


@dataclass(frozen=True)
class Directory:
    path: pathlib.Path
    expected: list[str]  # the lines the CLI prints after its first


def three_files(tmp_path: pathlib.Path, case: str) -> Directory:
    text, where, message = MALFORMED[case]
    c = join(site("s4"), SITE_UNKNOWN_FIELD)
    for name, body in [("a.yaml", text), ("b.yaml", site("s2")), ("c.yaml", c)]:
        (tmp_path / name).write_text(body)
    a = loader.read_text(text, "a.yaml").issues[0].message
    assert message in a
    return Directory(tmp_path, [f"  {tmp_path / 'a.yaml'}:{expected_line(text, where)} (document 0): {a}",
                                f"  {tmp_path / 'c.yaml'}:{line_of(c, 'colour:')} (document 1): spec.colour: unknown field 'colour'"])


@pytest.mark.parametrize("command", [["apply"], ["plan"], ["apply", "--dry-run"]], ids=["apply", "plan", "apply-dry-run"])
@pytest.mark.parametrize("case", ["bad-indentation", "unclosed-quote", "tab"])
def test_cli_directory_reports_every_file_and_applies_nothing(control_plane: support.ServerThread, tmp_path: pathlib.Path,
                                                              case: str, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert control_plane.cp is not None
    store = control_plane.cp.store
    before = store.resource_version(), support.user_events(store), support.desired_state(store)
    directory = three_files(tmp_path, case)
    assert cli_main.main(["--server", control_plane.url, *command, "-f", str(directory.path)]) == 1
    out = capsys.readouterr()
    assert out.err.splitlines() == ["error: 2 problem(s) in the manifests; nothing was applied", *directory.expected], out.err
    assert out.out == ""
    assert (store.resource_version(), support.user_events(store), support.desired_state(store)) == before


def test_installed_cli_reports_every_file_of_a_directory(control_plane: support.ServerThread, tmp_path: pathlib.Path) -> None:
    assert control_plane.cp is not None
    before = control_plane.cp.store.resource_version()
    directory = three_files(tmp_path, "unclosed-bracket")
    proc = support.cli("apply", "-f", str(directory.path), server_url=control_plane.url)
    assert proc.returncode == 1, proc
    assert proc.stderr.splitlines() == ["error: 2 problem(s) in the manifests; nothing was applied", *directory.expected], proc.stderr
    assert control_plane.cp.store.resource_version() == before
