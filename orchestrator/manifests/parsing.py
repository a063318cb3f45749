"""YAML text to PyYAML nodes, for :mod:`orchestrator.manifests.loader`: through libyaml's
parser where it reads as PyYAML's Python parser does, through the Python parser elsewhere,
with nesting bounded either way (docs/manifests.md, "Reading speed")."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Hashable, Iterator
from typing import Any

import yaml

try:  # libyaml's parser, in PyYAML's wheels
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - a PyYAML built without libyaml reads with its Python parser alone
    CParser = None

#: Far deeper than the loader's own limit (``loader.MAX_DEPTH``), which then reports the
#: field path; this one only keeps the recursion clear of Python's stack limit.
COMPOSE_MAX_DEPTH = 128


class TooDeep(yaml.YAMLError):
    def __init__(self, mark: yaml.Mark):
        super().__init__(f"nested deeper than {COMPOSE_MAX_DEPTH} levels")
        self.problem_mark = mark


class _DepthLimited(yaml.composer.Composer):
    """PyYAML composes nodes recursively: refuse absurd nesting before it overflows the stack.
    Only lists and mappings nest, so only they are counted (a scalar costs no extra call)."""

    _depth = 0

    def compose_sequence_node(self, anchor: str | None) -> yaml.SequenceNode:
        return self._nested(super().compose_sequence_node, anchor)  # type: ignore[no-any-return]

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        return self._nested(super().compose_mapping_node, anchor)  # type: ignore[no-any-return]

    def _nested(self, compose: Any, anchor: str | None) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > COMPOSE_MAX_DEPTH:
                raise TooDeep(self.peek_event().start_mark)
            return compose(anchor)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


class PythonLoader(_DepthLimited, yaml.SafeLoader):
    """PyYAML's own reader, scanner and parser, in Python. ``first_line``: the line of the
    text's start in its file, so every mark is a file line."""

    def __init__(self, stream: str, first_line: int = 1):
        super().__init__(stream)
        self.line = first_line - 1


if CParser is not None:
    class _FastLoader(_DepthLimited, CParser, yaml.resolver.Resolver):  # type: ignore[misc, valid-type]
        """libyaml's scanner and parser under PyYAML's composer and resolver: the same nodes,
        marks and tags as :class:`PythonLoader` gives, composed by the same Python (so
        with the same depth limit and anchors), from events read in C. It reads a
        manifest about four times faster (docs/manifests.md, "Reading speed")."""

        def __init__(self, stream: str):
            CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    FAST_LOADER: type | None = _FastLoader
else:  # pragma: no cover - see the import
    FAST_LOADER = None


@contextlib.contextmanager
def python_parser_only() -> Iterator[None]:
    """While it lasts, every text is read by PyYAML's Python parser alone, as where libyaml is
    missing (benchmarks and tests compare the two)."""
    global FAST_LOADER
    saved, FAST_LOADER = FAST_LOADER, None
    try:
        yield
    finally:
        FAST_LOADER = saved


#: What libyaml reads otherwise than PyYAML's Python parser, or may: a tab (libyaml takes
#: ``0\t``, PyYAML refuses it), a tag (``!`` alone is an empty document to PyYAML, a string
#: to libyaml), ``?`` (``{a? }``), a block scalar indicator (``|#``), a byte-order mark
#: (``\n\ufeff``), a directive, and the characters PyYAML's reader refuses. Manifests seldom
#: hold any; a text that does is read by the Python parser alone.
_PYTHON_ONLY = re.compile(r"[\t!?\ufeff|>]|^%|" + yaml.reader.Reader.NON_PRINTABLE.pattern, re.M)


def fast_loader(text: str) -> yaml.composer.Composer | None:
    """A loader of ``text`` through libyaml; None where libyaml is missing or the text holds
    what it may read otherwise (:data:`_PYTHON_ONLY`): the Python parser then reads it."""
    if FAST_LOADER is None or _PYTHON_ONLY.search(text):
        return None
    return FAST_LOADER(text)  # type: ignore[no-any-return]


class TagMisfit(yaml.constructor.ConstructorError):
    """A value whose explicit tag its text does not fit (``!!int '8{'``, ``!!bool maybe``);
    ``problem`` says so in one line."""


class Constructor(yaml.constructor.SafeConstructor):
    """PyYAML's safe constructor, whose constructors raise ValueError, KeyError or
    AttributeError where an explicit tag does not fit its text: here that is a
    :class:`TagMisfit`, a YAML error with the value's line, like any other."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the class
            tag = node.tag.rsplit(":", 1)[-1]
            what = repr(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            raise TagMisfit(None, None, f"cannot read {what} as {tag}", node.start_mark) from exc


class SafeLoader(Constructor, yaml.SafeLoader):
    """``yaml.SafeLoader`` with :class:`Constructor`'s errors (what a scenario is read with),
    refusing a key given twice in one mapping as the manifests loader does: PyYAML keeps
    the last silently, and a drill that names a site twice would lose the first change.

    Merge keys (``<<: *base``) are resolved here, without PyYAML's flattening: it rewrites an
    anchored mapping in place, so one merged again later showed its merged keys as its own
    (a false duplicate), and it keeps the first of two keys of equal text, so a mapping that
    merges one which overrides what it merged read the overridden value."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._merging: set[yaml.Node] = set()  # the mappings whose keys are being merged: one that merges itself is refused

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep)  # type: ignore[no-any-return]
        merged: dict[Any, Any] = {}  # the first source that has a key gives it; the mapping's own keys override all
        own: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, yaml.MappingNode) or source in self._merging:
                        found = "itself" if isinstance(source, yaml.MappingNode) else source.id
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark, f"expected a mapping for merging, but found {found}",
                            source.start_mark)
                    self._merging.add(source)
                    try:
                        for key, value in self.construct_mapping(source, deep=True).items():
                            merged.setdefault(key, value)
                    finally:
                        self._merging.discard(source)
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark)
            if key in own:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            own[key] = self.construct_object(value_node, deep=deep)
        return {**merged, **own}
