"""Manifest fuzzing: whatever the text, the loader returns documents or raises
ManifestError, and the API answers 200 or 4xx, never anything else; the loader says the
same of every text whether libyaml's parser reads it or PyYAML's Python one."""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import catalog
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError
from orchestrator.store import sqlite as store_mod
from orchestrator.testing import harness
from orchestrator.testing.manifests import reading

from .conftest import FUZZ, TRIED, text

VALID = [d for f in sorted(harness.EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    text(max_size=20), st.sampled_from(["EU", "FR", "edge", "datacenter", "onnx", "ray-serve", "local", "Site", "Model",
                                            "ModelDeployment", "edgeplane.io/v1alpha1", "", "-1", "1e308", "*"]),
)
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text(max_size=12), inner, max_size=4)),
                     max_leaves=25)


def check(text: str | bytes) -> None:
    assert reading(text) == reading(text, libyaml=False)  # libyaml's parser reads as PyYAML's does
    try:
        docs = loader.load_text(text, "fuzz.yaml")
    except ManifestError as exc:
        assert exc.issues and all(i.message for i in exc.issues)
        return
    assert isinstance(docs, list)
    assert all(isinstance(d, loader.LoadedDocument) for d in docs)
    for d in docs:  # what is taken can be stored and served: strict JSON, in UTF-8
        json.dumps(d.doc.model_dump(mode="json"), allow_nan=False, ensure_ascii=False).encode()


def _mutate(doc: Any, path: list[Any], value: Any, action: str) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for step in path[:-1]:
        node = node[step]
    last = path[-1]
    if action == "delete" and isinstance(node, dict):
        node.pop(last, None)
    else:
        node[last] = value
    return doc


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(st.one_of(text(max_size=300), st.binary(max_size=300)))
def test_random_text(text: str | bytes) -> None:
    TRIED["manifests: random text/bytes"] += 1
    check(text)


#: Pieces of YAML syntax, so that random text is mostly near-YAML: where two parsers could
#: read a text differently.
YAML_PIECES = ["a", "kind", "b c", ":", ": ", " ", "  ", "\n", "\r\n", "\r", "\x85", "\u2028", "\ufeff", "- ", "-", "[",
               "]", "{", "}", ", ", "'", "''", '"', '\\"', "\\", "#", " # c", "&x ", "*x", "? ", "|", ">-", "|+", "---",
               "...", "1", "-0.5e3", "0x1F", "0o17", "017", "1_000", ".inf", "~", "null", "yes", "On", "2024-01-02",
               "12:30:00", "=", "<<", "é", "💡", "@", "`", "%", "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ",
               "!!str ", "!!map ", "!!seq ", "!x "]


@FUZZ
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join))
def test_near_yaml_text(text: str) -> None:
    TRIED["manifests: near-YAML text"] += 1
    check(text)


@FUZZ
@given(st.lists(trees, min_size=1, max_size=3))
def test_random_structures(docs: list[Any]) -> None:
    TRIED["manifests: random structures"] += 1
    check(yaml.safe_dump_all(docs))
    check("\n---\n".join(yaml.safe_dump({"apiVersion": "edgeplane.io/v1alpha1", "kind": "Site", "metadata": {"name": "s"}, "spec": d}) for d in docs))


@FUZZ
@given(st.data())
def test_mutations_of_valid_documents(data: st.DataObject) -> None:
    TRIED["manifests: mutated examples"] += 1
    doc = data.draw(st.sampled_from(VALID))
    paths = _paths(doc)
    mutated = doc
    for _ in range(data.draw(st.integers(1, 3))):
        path = list(data.draw(st.sampled_from(paths)))
        try:
            mutated = _mutate(mutated, path, data.draw(trees), data.draw(st.sampled_from(["set", "delete"])))
        except (KeyError, IndexError, TypeError):
            continue
    check(yaml.safe_dump(mutated))


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 2000), st.binary(min_size=1, max_size=8))
def test_byte_corruption_of_valid_text(doc: Any, offset: int, junk: bytes) -> None:
    TRIED["manifests: corrupted bytes"] += 1
    raw = yaml.safe_dump(doc).encode()
    offset %= len(raw)
    check(raw[:offset] + junk + raw[offset + len(junk):])


@FUZZ
@given(st.lists(st.sampled_from(VALID), min_size=1, max_size=4), st.data())
def test_apply_through_the_catalog_is_atomic(docs: list[Any], data: st.DataObject) -> None:
    """Mutated documents through validation + store: either all written or none."""
    TRIED["manifests: catalog apply"] += 1
    store = store_mod.Store(":memory:")
    try:
        text = yaml.safe_dump_all(docs)
        if data.draw(st.booleans()):
            victim = data.draw(st.integers(0, len(docs) - 1))
            paths = _paths(docs[victim])
            if paths:
                docs = list(docs)
                docs[victim] = _mutate(docs[victim], list(data.draw(st.sampled_from(paths))), data.draw(trees), "set")
                text = yaml.safe_dump_all(docs)
        before = store.resource_version()
        try:
            catalog.apply_documents(store, loader.load_text(text, "fuzz.yaml"), actor="fuzz")
        except (ManifestError, store_mod.Conflict):
            assert store.resource_version() == before and store.list() == []
            return
        names = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs}
        assert {(o.kind, o.name) for o in store.list()} == names
    finally:
        store.close()
