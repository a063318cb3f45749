"""Manifests are read through libyaml's parser where it reads as PyYAML's Python parser does,
and by the Python parser alone everywhere else: the documents, their field lines and every
issue come out the same either way (docs/manifests.md, "Reading speed")."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.manifests import loader, parsing
from orchestrator.testing.manifests import reading

from .support import join
from .test_bad_manifests import BAD, GOOD_SITE, H


@pytest.fixture
def python_parser_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts PyYAML's Python parser was given."""
    given: list[str] = []
    python_loader = parsing.PythonLoader

    def counted(stream: str, first_line: int = 1) -> parsing.PythonLoader:
        given.append(stream)
        return python_loader(stream, first_line)

    monkeypatch.setattr(parsing, "PythonLoader", counted)
    return given


def test_a_plain_manifest_is_read_by_libyaml_alone(python_parser_used: list[str]) -> None:
    text = join(GOOD_SITE, GOOD_SITE.replace("name: s1", "name: s2"))
    read = loader.read_text(text, "m.yaml")
    assert [d.name for d in read.documents] == ["s1", "s2"] and not read.issues
    assert python_parser_used == []
    lines = text.split("\n")
    second = lines.index("  name: s2")
    assert read.documents[1].line_of(("spec", "capacity", "cpu")) == lines.index("    cpu: 8", second) + 1


@pytest.mark.parametrize("text", [
    GOOD_SITE.replace("tier: edge", "tier: !!str edge"),  # a tag
    GOOD_SITE.replace("tier: edge", "tier: edge\t"),  # a tab: libyaml takes it where PyYAML does not
    "%YAML 1.1\n---\n" + GOOD_SITE,  # a directive
    GOOD_SITE.replace("metadata:", "metadata: # a comment\n  annotations:\n    note: >\n      folded\n      text\n"),
    GOOD_SITE + "\ufeff",  # a byte-order mark past the start
    GOOD_SITE.replace("tier: edge", "tier: '\x07'"),  # a character PyYAML's reader refuses
], ids=["tag", "tab", "directive", "folded-scalar", "late-bom", "control-character"])
def test_what_libyaml_may_read_otherwise_is_read_by_the_python_parser(text: str, python_parser_used: list[str]) -> None:
    loader.read_text(text, "m.yaml")
    assert python_parser_used[:1] == [text]  # (then each document of it, where the whole could not be read)


@pytest.mark.parametrize("case", [c for c in BAD if isinstance(c.text, str)], ids=[c.id for c in BAD if isinstance(c.text, str)])
def test_every_bad_manifest_says_the_same_through_either_parser(case: Any) -> None:
    assert reading(case.text, libyaml=True) == reading(case.text, libyaml=False)


def test_malformed_yaml_after_good_documents_is_read_again_by_the_python_parser(python_parser_used: list[str]) -> None:
    """libyaml's read of the file is dropped whole: the Python parser keeps the documents
    before the error and reads on after it, in its own words."""
    broken = H + "kind: Site\nmetadata:\n  name: s2\n bad: indentation\n"
    text = join(GOOD_SITE, broken, GOOD_SITE.replace("name: s1", "name: s3"))
    read, lines = reading(text, libyaml=True)
    assert (read, lines) == reading(text, libyaml=False)
    assert [d.name for d in read.documents] == ["s1", "s3"]
    assert [(i.document, i.line) for i in read.issues] == [(1, text.split("\n").index(" bad: indentation") + 1)]
    assert python_parser_used and python_parser_used[0] == text


def test_a_file_past_the_document_limit_keeps_what_came_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_DOCUMENTS", 3)
    text = join(*(GOOD_SITE.replace("name: s1", f"name: s{i}") for i in range(6)))
    read, lines = reading(text, libyaml=True)
    assert (read, lines) == reading(text, libyaml=False)
    assert len(read.documents) == 3 and "more than 3 documents" in read.issues[0].message and not read.complete


@pytest.mark.parametrize("text", [
    GOOD_SITE.rstrip("\n"),  # no line break at the end
    GOOD_SITE.replace("\n", "\r\n"),
    GOOD_SITE.replace("\n", "\r"),
    GOOD_SITE.replace("\n", "\x85"),
    GOOD_SITE.replace("\n", "\u2028"),
    "\ufeff" + GOOD_SITE,
    GOOD_SITE.replace("metadata:", "metadata:\n  labels:\n    a: &x [1, 2]\n    b: *x\n    c:").rstrip("\n"),
    "[" + ", ".join(['{"apiVersion": "edgeplane.io/v1alpha1", "kind": "Site", "metadata": {"name": "j"}, "spec": {}}'] * 2) + "]",
    GOOD_SITE + "---\n---\n...\n",
], ids=["no-final-break", "crlf", "cr", "nel", "line-separator", "bom", "anchors-and-empty-value", "json-list", "empty-documents"])
def test_line_breaks_anchors_and_json_read_the_same(text: str) -> None:
    assert reading(text, libyaml=True) == reading(text, libyaml=False)
