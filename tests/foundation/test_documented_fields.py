"""Every field a manifest may hold is named in docs/manifests.md, in the part about its
kind: unknown fields are errors, so a field the schema takes but the reference leaves out
is one an operator meets only in ``get -o yaml`` output (README: "every manifest field")."""

from __future__ import annotations

import pathlib
import re
import typing

import pytest
from pydantic import BaseModel

from orchestrator.manifests import schema

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "manifests.md").read_text()
#: The sections of docs/manifests.md that describe each kind's spec; what every kind has
#: (``metadata``) is described once, before them.
SECTIONS = {"Site": ("Site",), "Model": ("Model", "Generative models"), "ModelDeployment": ("ModelDeployment", "Cascades")}
COMMON = DOC[:DOC.index("\n## ")]


def section(title: str) -> str:
    """A ``## title`` section with its subsections."""
    start = re.search(rf"^## {re.escape(title)}\b.*$", DOC, re.M)
    assert start, f"docs/manifests.md has no section '## {title}'"
    end = re.compile(r"^## ", re.M).search(DOC, start.end())
    return DOC[start.start():end.start() if end else len(DOC)]


def models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``list[Variant] | None`` -> ``[Variant]``)."""
    found = [m for arg in typing.get_args(annotation) for m in models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append(annotation)
    return found


def fields(model: type[BaseModel], path: str, seen: frozenset[type[BaseModel]]) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(f"{path}.{name}")
        for inner in models_in(field.annotation):
            if inner not in seen:
                out.extend(fields(inner, f"{path}.{name}", seen | {inner}))
    return out


def named(leaf: str, text: str) -> bool:
    """In code: `leaf`, `a.leaf`, `leaf[]`, in a list "`a`, `leaf`", or a YAML key `leaf: ...`."""
    word = re.escape(leaf)
    return (re.search(rf"`(?:[\w.\[\]]*\.)?{word}(?:\[\])?[`.,\[ ]", text) is not None
            or re.search(rf"(?:^\s*|`|[{{,]\s*){word}:", text, re.M) is not None)


@pytest.mark.parametrize("kind", sorted(schema.DOC_TYPES))
def test_every_field_of_a_kind_is_named_where_the_reference_describes_it(kind: str) -> None:
    doc_type = schema.DOC_TYPES[kind]
    described = "".join(section(title) for title in SECTIONS[kind])
    missing = [f for f in fields(doc_type, kind, frozenset({doc_type}))
               if f.count(".") > 1 and not named(f.rsplit(".", 1)[1], COMMON if f.startswith(f"{kind}.metadata.") else described)]
    assert not missing, f"docs/manifests.md's {kind} reference never names {missing}"
