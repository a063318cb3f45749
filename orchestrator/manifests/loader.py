"""Parse YAML/JSON manifest text into validated documents, keeping line numbers.

PyYAML's node graph carries positions, so the text is composed to nodes first, each
field path is mapped to its line, and pydantic's error locations are translated back to
``file:line``. The node walk also refuses what safe loading alone lets through: duplicate
keys (silently overwritten by PyYAML), alias bombs and absurd nesting.

A document with errors does not stop the others from being read: :func:`read_text` keeps
every issue and remembers the kind and name of each refused document, so the checks
between documents can run on the rest in the same pass and one apply reports all it can.
"""

from __future__ import annotations

import bisect
import pathlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import pydantic
import yaml

from orchestrator.manifests import schema
from orchestrator.manifests.errors import ManifestError, ManifestIssue

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_DOCUMENTS = 1_000
COMPOSE_MAX_DEPTH = 4 * MAX_DEPTH

Path = tuple[str | int, ...]

# Keyed by pattern, not field name: the same field (``spec.variant``) may hold a name or a
# map, and a label key and a label value follow different rules.
_PATTERN_HINTS = {
    schema.NAME_PATTERN: "use lowercase letters, digits and '-' (a DNS label, at most 63 characters)",
    schema.LABEL_KEY_PATTERN: "letters, digits, '-', '_', '.', '/' (alphanumeric at both ends)",
    schema.LABEL_VALUE_PATTERN: "letters, digits, '-', '_', '.' (at most 63 characters, alphanumeric at both ends)",
    schema.SHA256_PATTERN: "expected 64 lowercase hexadecimal digits",
    schema.IMPORT_PATH_PATTERN: "expected 'package.module:attribute'",
    schema.PERCENT_PATTERN: "expected a count or a percentage from 0% to 100% such as '25%'",
}


@dataclass(frozen=True)
class LoadedDocument:
    file: str
    index: int
    line: int
    doc: schema.Document
    #: field path -> line in ``file``, so later checks can point at the field itself
    lines: Mapping[Path, int] = field(default_factory=dict, compare=False, repr=False)

    def line_of(self, path: Path) -> int:
        """The line of ``path``, or of its nearest ancestor present in the text."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return self.line

    @property
    def kind(self) -> str:
        return self.doc.kind

    @property
    def name(self) -> str:
        return self.doc.metadata.name


@dataclass(frozen=True)
class RefusedDocument:
    """A document with errors of its own; its kind and ``metadata.name`` where both could
    still be read, so that what refers to it is not told it does not exist."""

    file: str
    index: int
    line: int
    kind: str | None = None
    name: str | None = None
    name_line: int | None = None


@dataclass(frozen=True)
class Reading:
    """Everything one text (a file or a :func:`bundle`) holds: the documents that passed,
    those that did not, and every issue found, in file then document order."""

    documents: list[LoadedDocument]
    refused: list[RefusedDocument]
    issues: list[ManifestIssue]
    #: file names in the order they come, which is the order issues are reported in
    files: tuple[str, ...]
    #: False when reading stopped before the end (malformed YAML, too many documents): the
    #: rest of the text may define anything, so references cannot be judged
    complete: bool = True

    @classmethod
    def of(cls, docs: list[LoadedDocument]) -> Reading:
        return cls(docs, [], [], tuple(dict.fromkeys(d.file for d in docs)))

    def refused_names(self) -> set[tuple[str, str]]:
        """(kind, name) of each refused document whose kind and name could be read."""
        return {(r.kind, r.name) for r in self.refused if r.kind is not None and r.name is not None}

    def ordered(self, more: list[ManifestIssue]) -> list[ManifestIssue]:
        """These issues and ``more`` (found later, by the checks between documents) in order."""
        return in_order([*self.issues, *more], self.files)

    def valid(self) -> list[LoadedDocument]:
        """The documents, or :class:`ManifestError` with every issue when there is one."""
        if self.issues:
            raise ManifestError(self.issues)
        return self.documents


def in_order(issues: list[ManifestIssue], files: tuple[str, ...]) -> list[ManifestIssue]:
    """By file (in the order of ``files``), then document, the issues of a whole file first;
    within one document, in the order given."""
    rank: dict[str, int] = {}
    for name in files:
        rank.setdefault(name, len(rank))
    return sorted(issues, key=lambda i: (rank.get(i.file, len(rank)), -1 if i.document is None else i.document))


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Walker:
    """Turns a composed node into plain data and a path -> line map, with limits."""

    def __init__(self, file: str, index: int):
        self.file, self.index = file, index
        self.lines: dict[Path, int] = {}
        #: scalars written without quotes that YAML read as something other than text (a
        #: number, a boolean, a date), as written: a string field given one says to quote it
        self.unquoted: dict[Path, str] = {}
        self.count = 0
        self._seen: set[int] = set()  # ids of nodes walked: meeting one again means an alias
        self.constructor = yaml.SafeLoader.__new__(yaml.SafeLoader)
        yaml.constructor.SafeConstructor.__init__(self.constructor)

    def issue(self, path: Path, line: int | None, message: str) -> ManifestError:
        return ManifestError([ManifestIssue(self.file, self.index, format_path(path), line, message)])

    def to_data(self, node: yaml.Node, path: Path = (), depth: int = 0, written_at: int | None = None,
                alias: tuple[Path, int | None] | None = None) -> Any:
        """``written_at``: the line this value sits on in the text; ``alias``: where the alias
        this value was expanded from is written (path and line), once inside one."""
        self.count += 1
        line = node.start_mark.line + 1
        if alias is None and id(node) in self._seen:
            alias = (path, written_at)
        self._seen.add(id(node))
        if self.count > MAX_NODES:
            # name the alias in the text, not a path that exists only in the expansion
            where, at = alias if alias is not None else (path, line)
            raise self.issue(where, at, f"document has more than {MAX_NODES} values (alias expansion?)")
        if depth > MAX_DEPTH:
            raise self.issue(path, line, f"document is nested deeper than {MAX_DEPTH} levels")
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self.issue(path, key_node.start_mark.line + 1, "YAML merge keys (<<) are not supported")
                key = self.constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise self.issue(path, key_node.start_mark.line + 1, f"keys must be strings, got {key!r}")
                if key in out:
                    raise self.issue((*path, key), key_node.start_mark.line + 1, f"duplicate key {key!r}")
                out[key] = self.to_data(value_node, (*path, key), depth + 1, key_node.start_mark.line + 1, alias)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.to_data(v, (*path, i), depth + 1, line, alias) for i, v in enumerate(node.value)]
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise self.issue(path, line, f"cannot read value: {exc.problem}") from exc
        if value is not None and not isinstance(value, str):
            self.unquoted[path] = node.value
        return value

    def line_of(self, path: Path) -> int | None:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None


class _TooDeep(yaml.YAMLError):
    def __init__(self, line: int):
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")
        self.line = line


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML composes nodes recursively: refuse absurd nesting before it overflows the stack."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            # Far deeper than _Walker's limit, which then reports the field path; this one
            # only keeps the recursion clear of Python's stack limit.
            if self._depth > COMPOSE_MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


def _is_empty(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _decode(text: bytes | str, file: str) -> str:
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise ManifestError([ManifestIssue(file, None, "", None, f"file is larger than {MAX_BYTES // (1024 * 1024)} MiB")])
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError([ManifestIssue(file, None, "", None, f"not UTF-8 text (byte {exc.start})")]) from exc
    if len(text) > MAX_BYTES:
        raise ManifestError([ManifestIssue(file, None, "", None, f"file is larger than {MAX_BYTES // (1024 * 1024)} MiB")])
    return text


@dataclass
class _Raw:
    """One document as composed: its data, or the issues that stopped the walk over it."""

    node: yaml.Node
    walker: _Walker
    data: Any = None
    issues: list[ManifestIssue] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.walker.index


def _walk(node: yaml.Node, file: str, index: int) -> _Raw:
    # a duplicate key or an alias bomb spoils its own document only: the stream goes on
    raw = _Raw(node, _Walker(file, index))
    try:
        raw.data = raw.walker.to_data(node)
    except ManifestError as exc:
        raw.issues = exc.issues
    return raw


def _documents(text: str, file: str) -> Iterator[_Raw]:
    try:
        loader = _LimitedLoader(text)  # the reader refuses control characters right here
    except yaml.YAMLError as exc:
        raise ManifestError([ManifestIssue(file, 0, "", None, f"malformed YAML: {exc}")]) from exc
    index = 0
    total = 0  # empty documents included, so a file of '---' lines stays bounded
    try:
        while loader.check_node():
            node = loader.get_node()
            total += 1
            if total > MAX_DOCUMENTS:
                raise ManifestError([ManifestIssue(file, None, "", None, f"more than {MAX_DOCUMENTS} documents in one file")])
            if node is None or _is_empty(node):
                continue  # empty documents (e.g. between two '---') are not counted
            items = node if isinstance(node, yaml.SequenceNode) else _list_items(node)
            if items is not None:  # a JSON array (or YAML list) of documents, or a list as `get -o yaml` prints it
                for item in items.value:
                    yield _walk(item, file, index)
                    index += 1
            else:
                yield _walk(node, file, index)
                index += 1
            if index > MAX_DOCUMENTS:
                raise ManifestError([ManifestIssue(file, index, "", None, f"more than {MAX_DOCUMENTS} documents in one file")])
    except _TooDeep as exc:
        raise ManifestError([ManifestIssue(file, index, "", exc.line, f"document is nested deeper than {MAX_DEPTH} levels")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError([ManifestIssue(file, index, "", line, f"malformed YAML: {problem}")]) from exc
    finally:
        loader.dispose()


def _fields(node: yaml.Node) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def _list_items(node: yaml.Node) -> yaml.SequenceNode | None:
    """The ``items`` of a list as ``edgeplane get KIND -o yaml|json`` prints it (``kind`` and
    ``items``, no ``metadata`` or ``spec``), so that output can be applied again."""
    if not isinstance(node, yaml.MappingNode):
        return None
    fields = _fields(node)
    items = fields.get("items")
    if isinstance(items, yaml.SequenceNode) and not {"metadata", "spec"} & set(fields):
        return items
    return None


#: Written by the control plane, never by a manifest: apply ignores them, so what `get`
#: prints can be applied again (``metadata.resourceVersion`` then makes it conditional).
SERVER_SET = {"status"}
SERVER_SET_METADATA = {"generation", "creationTimestamp"}


def _without_server_set(data: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in data.items() if k not in SERVER_SET}
    if isinstance(data.get("metadata"), dict):
        data["metadata"] = {k: v for k, v in data["metadata"].items() if k not in SERVER_SET_METADATA}
    return data


def _validate(data: Any, walker: _Walker) -> schema.Document | list[ManifestIssue]:
    file, index = walker.file, walker.index

    def issue(path: Path, message: str) -> ManifestIssue:
        return ManifestIssue(file, index, format_path(path), walker.line_of(path), message)

    if not isinstance(data, dict):
        return [issue((), f"a document must be a mapping with apiVersion/kind/metadata/spec, got {type(data).__name__}")]
    kind = data.get("kind")
    if data.get("apiVersion") != schema.API_VERSION:
        return [issue(("apiVersion",), f"apiVersion must be {schema.API_VERSION!r}, got {data.get('apiVersion')!r}")]
    doc_type = schema.DOC_TYPES.get(kind) if isinstance(kind, str) else None
    if doc_type is None:
        return [issue(("kind",), f"unknown kind {kind!r}; expected one of {', '.join(schema.KINDS)}")]
    data = _without_server_set(data)
    try:
        return doc_type.model_validate(data, context=schema.MANIFEST)  # type: ignore[return-value]
    except pydantic.ValidationError as exc:
        messages: dict[Path, list[str]] = {}
        for err in exc.errors(include_url=False):
            loc = _data_path(data, tuple(err["loc"]), err["type"] == "missing")
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown field {loc[-1]!r}"
            elif err["type"] == "missing":
                message = "required field is missing"
            elif err["type"] == "string_type" and loc in walker.unquoted:
                message = _quote_hint(walker.unquoted[loc], err.get("input"))
            elif err["type"] == "string_pattern_mismatch":
                hint = _PATTERN_HINTS.get(str((err.get("ctx") or {}).get("pattern")), "does not match the expected format")
                message = f"{err.get('input')!r} is not valid: {hint}"
            if message not in messages.setdefault(loc, []):
                messages[loc].append(message)
        # one issue per field: a value failing every member of a union (name or map,
        # count or percentage) gets the members' reasons joined
        return [issue(loc, "; or ".join(msgs)) for loc, msgs in messages.items()]


def _quote_hint(written: str, value: Any) -> str:
    """Why a text field got ``value``: YAML reads unquoted digits (a sha256 of digits only,
    a version), ``yes``/``no`` (Norway's ``NO``) and dates as other types."""
    if isinstance(value, bool):
        what = f"a boolean ({str(value).lower()})"
    elif isinstance(value, (int, float)):
        what = "a number"
    else:
        what = f"a {type(value).__name__}"
    return f"{written} was read as {what}, not text: put it in quotes"


def _holds(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return isinstance(part, str) and part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _data_path(data: Any, loc: Path, missing: bool) -> Path:
    """Pydantic's error location without its union-member tags (``int``, ``constrained-str``...)."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if _holds(node, part):
            node = node[part]
        elif missing and i == len(loc) - 1 and isinstance(node, dict):
            node = None
        else:
            continue  # a union member's name or a '[key]' marker, not a place in the text
        out.append(part)
    return tuple(out)


SOURCE_MARKER = "#@edgeplane-source: "


def bundle(files: list[tuple[str, str]]) -> str:
    """Join several files into one apply body that keeps each file's name and line numbers."""
    parts = []
    for name, text in files:
        # a byte-order mark (Windows editors) is only allowed at the start of the stream;
        # inside the bundle it would become part of the first key
        parts.append(f"---\n{SOURCE_MARKER}{name}\n{text.removeprefix(chr(0xFEFF)).rstrip()}\n")
    return "".join(parts)


@dataclass(frozen=True)
class _Source:
    name: str
    first_line: int  # line of the file's first line within the bundle (1-based)


def _sources(text: str, default: str) -> list[_Source]:
    sources = [_Source(default, 1)]
    for i, line in enumerate(text.splitlines(), start=1):
        if line.startswith(SOURCE_MARKER):
            sources.append(_Source(line[len(SOURCE_MARKER):].strip()[:256] or default, i + 1))
    return sources


class _Bundle:
    """Where each line and document of a :func:`bundle` came from, worked out once."""

    def __init__(self, sources: list[_Source], starts: list[int]) -> None:
        self.sources = sources
        self._firsts = [s.first_line for s in sources]
        self._files = [self.locate(start)[0] for start in starts]  # file of each document
        self._in_file: list[int] = []  # each document's index within its own file
        seen: Counter[str] = Counter()
        for name in self._files:
            self._in_file.append(seen[name])
            seen[name] += 1

    def locate(self, line: int | None) -> tuple[str, int | None]:
        """A bundle line as (file, line within that file)."""
        if line is None or len(self.sources) == 1:
            return self.sources[0].name, line
        src = self.sources[max(0, bisect.bisect_right(self._firsts, line) - 1)]
        return src.name, line - src.first_line + 1

    def index_in_file(self, name: str, index: int) -> int:
        """A bundle-wide document index as an index within file ``name``."""
        if index < len(self._files) and self._files[index] == name:
            return self._in_file[index]
        return sum(1 for f in self._files[:index] if f == name)

    def relocate_document(self, d: LoadedDocument) -> LoadedDocument:
        name, line = self.locate(d.line)
        offset = d.line - (line or d.line)
        index = self.index_in_file(name, d.index)
        return LoadedDocument(name, index, line or 1, d.doc, {p: n - offset for p, n in d.lines.items()})

    def relocate_refused(self, d: RefusedDocument) -> RefusedDocument:
        name, line = self.locate(d.line)
        offset = d.line - (line or d.line)
        name_line = d.name_line - offset if d.name_line is not None else None
        return RefusedDocument(name, self.index_in_file(name, d.index), line or 1, d.kind, d.name, name_line)

    def relocate(self, issue: ManifestIssue) -> ManifestIssue:
        name, line = self.locate(issue.line)
        document = issue.document
        if document is not None:
            document = self.index_in_file(name, document)
        return ManifestIssue(name, document, issue.field, line, issue.message)


def read_text(text: bytes | str, file: str = "<input>") -> Reading:
    """Parse and validate every document of one file (or :func:`bundle`), keeping going past
    documents with errors; only a text that cannot be read on stops early."""
    try:
        body = _decode(text, file)
    except ManifestError as exc:
        return Reading([], [], exc.issues, (file,), complete=False)
    sources = _sources(body, file)
    starts: list[int] = []  # start line of each document, by global index
    read, issues, complete = _load(body, file, starts)
    if len(sources) > 1:
        where = _Bundle(sources, starts)
        read = [where.relocate_document(d) if isinstance(d, LoadedDocument) else where.relocate_refused(d) for d in read]
        issues = [where.relocate(i) for i in issues]
    docs = [d for d in read if isinstance(d, LoadedDocument)]
    refused = [d for d in read if isinstance(d, RefusedDocument)]
    files = tuple(dict.fromkeys(s.name for s in sources))
    return Reading(docs, refused, in_order(issues + _check_unique(read), files), files, complete)


def load_text(text: bytes | str, file: str = "<input>") -> list[LoadedDocument]:
    """Every document of one file (or :func:`bundle`); :class:`ManifestError` with every issue
    found when any document has one."""
    return read_text(text, file).valid()


def _check_unique(read: list[LoadedDocument | RefusedDocument]) -> list[ManifestIssue]:
    """A kind and name given twice, a refused document's too (the fix of one must not
    reveal the other)."""
    issues = []
    seen: dict[tuple[str, str], LoadedDocument | RefusedDocument] = {}
    for d in read:
        if isinstance(d, LoadedDocument):
            kind, name, line = d.kind, d.name, d.line_of(("metadata", "name"))
        elif d.kind is not None and d.name is not None:
            kind, name, line = d.kind, d.name, d.name_line
        else:
            continue
        first = seen.setdefault((kind, name), d)
        if first is not d:
            where = f"document {first.index}" if first.file == d.file else f"{first.file} document {first.index}"
            issues.append(ManifestIssue(d.file, d.index, "metadata.name", line, f"{kind} {name!r} is defined twice (also {where})"))
    return issues


def _refused(raw: _Raw) -> RefusedDocument:
    """What a refused document still says of itself, read from the text as written."""
    line = raw.node.start_mark.line + 1
    fields = _fields(raw.node)
    kind = fields.get("kind")
    name = _fields(fields["metadata"]).get("name") if "metadata" in fields else None
    if _is_text(kind) and kind.value in schema.DOC_TYPES and _is_text(name):
        return RefusedDocument(raw.walker.file, raw.index, line, kind.value, name.value, name.start_mark.line + 1)
    return RefusedDocument(raw.walker.file, raw.index, line)


def _is_text(node: yaml.Node | None) -> TypeGuard[yaml.ScalarNode]:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" and bool(node.value)


def _load(body: str, file: str, starts: list[int]) -> tuple[list[LoadedDocument | RefusedDocument], list[ManifestIssue], bool]:
    """Each document in order, loaded or refused; every issue; whether the text was read to its end."""
    read: list[LoadedDocument | RefusedDocument] = []
    issues: list[ManifestIssue] = []
    try:
        for raw in _documents(body, file):
            line = raw.node.start_mark.line + 1
            starts.append(line)
            result = raw.issues or _validate(raw.data, raw.walker)
            if isinstance(result, list):
                issues.extend(result)
                read.append(_refused(raw))
            else:
                read.append(LoadedDocument(file, raw.index, line, result, dict(raw.walker.lines)))
    except ManifestError as exc:  # the stream itself is broken: what came before it still counts
        return read, issues + exc.issues, False
    return read, issues, True


def manifest_files(target: pathlib.Path) -> list[pathlib.Path]:
    """A file, or every ``*.yaml``/``*.yml``/``*.json`` in a directory (sorted, not recursive)."""
    if target.is_dir():
        return sorted(p for p in target.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    return [target]
