"""Parse YAML/JSON manifest text into validated documents, keeping line numbers.

PyYAML's node graph carries positions, so the text is composed to nodes first
(:mod:`orchestrator.manifests.parsing`: libyaml's parser where it reads as PyYAML's own does)
and each field path is mapped to its line; :mod:`orchestrator.manifests.validation` then checks each
document against its kind's schema and says every error at ``file:line``. The node walk also refuses what safe loading alone lets through: duplicate
keys (silently overwritten by PyYAML), alias bombs, absurd nesting, and values JSON cannot
hold as written (:func:`_not_json`): what is stored goes into JSON columns and out in JSON
answers, where a lone surrogate failed every read of the object, binary data failed the
write and a NaN turned into null.

A document with errors does not stop the others from being read: :func:`read_text` keeps
every issue and remembers the kind and name of each refused document, so the checks
between documents can run on the rest in the same pass and one apply reports all it can.
Malformed YAML spoils only the document it is in: each file of a :func:`bundle` is read
on its own, and within a file reading goes on at the next ``---`` line.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import yaml

from orchestrator import unicode_text
from orchestrator.manifests import parsing, schema, validation
from orchestrator.manifests.errors import ManifestError, ManifestIssue
from orchestrator.manifests.validation import Path, format_path

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_DOCUMENTS = 1_000


@dataclass(frozen=True)
class LoadedDocument:
    file: str
    index: int
    line: int
    #: a :class:`schema.Reference` (kind and name, no spec) only in a delete's reading
    doc: schema.Document | schema.Reference
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
    #: False when part of the text could not be read (malformed YAML, too many documents):
    #: that part may define anything, so references cannot be judged
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
        self.constructor = parsing.Constructor()

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
                key = self._construct(key_node, path)
                if not isinstance(key, str):
                    raise self.issue(path, key_node.start_mark.line + 1, f"keys must be strings, got {key!r}")
                if (problem := _not_json(key)) is not None:
                    raise self.issue(path, key_node.start_mark.line + 1, f"the key {problem}")
                if key in out:
                    raise self.issue((*path, key), key_node.start_mark.line + 1, f"duplicate key {key!r}")
                out[key] = self.to_data(value_node, (*path, key), depth + 1, key_node.start_mark.line + 1, alias)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.to_data(v, (*path, i), depth + 1, line, alias) for i, v in enumerate(node.value)]
        value = self._construct(node, path)
        if (problem := _not_json(value)) is not None:
            raise self.issue(path, line, problem)
        if value is not None and not isinstance(value, str):
            self.unquoted[path] = node.value
        return value

    def _construct(self, node: yaml.Node, path: Path) -> Any:
        """The value of a scalar (or of a key, which may be any node)."""
        line = node.start_mark.line + 1
        try:
            return self.constructor.construct_object(node, deep=True)
        except parsing.TagMisfit as exc:  # an explicit tag the text does not fit: !!int '8{', !!bool maybe
            raise self.issue(path, line, str(exc.problem)) from exc
        except yaml.constructor.ConstructorError as exc:
            raise self.issue(path, line, f"cannot read value: {exc.problem}") from exc

    def line_of(self, path: Path) -> int | None:
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None


def _not_json(value: Any) -> str | None:
    """Why a scalar YAML read cannot be kept as JSON (None when it can). The schema's typed
    fields would refuse some of these, but free-form maps (``args``, ``llm.engineArgs``) take
    any value, and a string anywhere (an annotation, a region) was stored as read."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # the escape "\ud800": half of a UTF-16 pair, no character
            return f"holds a lone surrogate (\\u{ord(value[exc.start]):04x}), which is not Unicode text"
        return None
    if isinstance(value, bytes):
        return "binary data (!!binary) has no JSON form: give it as text (base64, for instance)"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number: NaN and infinity have no JSON form"
    return None


def _is_empty(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


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


SOURCE_MARKER = "#@edgeplane-source: "
_SOURCE_LINE = re.compile("^" + re.escape(SOURCE_MARKER) + r"([^\n]*)\n?", re.M)
_MiB = 1024 * 1024


def bundle(files: list[tuple[str, str]]) -> str:
    """Join several files into one apply body that keeps each file's name and line numbers."""
    parts = []
    for name, text in files:
        # a byte-order mark (Windows editors) is only allowed at the start of the stream;
        # inside the bundle it would become part of the first key
        parts.append(f"---\n{SOURCE_MARKER}{name}\n{text.removeprefix(chr(0xFEFF)).rstrip()}\n")
    return "".join(parts)


def _source_name(marker: re.Match[str], default: str) -> str:
    return marker.group(1).strip()[:256] or default


def _split(body: str, default: str) -> list[tuple[str, str]]:
    """A :func:`bundle` as (file name, text) pairs, each text as in its file (line 1 first),
    so each file is read on its own and malformed YAML in one cannot hide the others;
    whatever comes before the first file is ``default``'s."""
    if SOURCE_MARKER not in body:
        return [(default, body)]
    out: list[tuple[str, str]] = []
    name, start = default, 0
    for marker in _SOURCE_LINE.finditer(body):
        text = body[start:marker.start()]
        if text == "---\n" or text.endswith("\n---\n"):  # the separator bundle() writes before a file
            text = text[:-4]
        out.append((name, text))
        name, start = _source_name(marker, default), marker.end()
    out.append((name, body[start:]))
    return out


def size_issue(text: bytes | str, file: str = "<input>") -> ManifestIssue | None:
    """``None`` when ``text`` (a file or a :func:`bundle`) is within :data:`MAX_BYTES`;
    else the issue, naming the file of a bundle at which the files together pass it (the
    limit is the request's: a directory larger than it is applied in parts)."""
    if len(text) <= MAX_BYTES:
        return None
    head = text[:MAX_BYTES + 1]
    head = head.decode("utf-8", "ignore") if isinstance(head, bytes) else head
    markers = list(_SOURCE_LINE.finditer(head))
    limit = f"{MAX_BYTES // _MiB} MiB"
    if len(markers) <= 1:
        name = _source_name(markers[0], file) if markers else file
        return ManifestIssue(name, None, "", None, f"file is larger than {limit}")
    return ManifestIssue(_source_name(markers[-1], file), None, "", None,
                         f"with the {len(markers) - 1} file(s) before it, this file passes {limit}, the most one apply "
                         "reads: apply the files in smaller groups")


def _decode(text: bytes | str, file: str) -> str:
    issue = size_issue(text, file)
    if issue is not None:
        raise ManifestError([issue])
    if isinstance(text, bytes):
        try:
            return unicode_text.decoded(text)  # UTF-8, or UTF-16/32 behind a byte-order mark, as YAML 1.1 reads
        except unicode_text.NotText as exc:
            raise ManifestError([ManifestIssue(file, None, "", None, str(exc))]) from exc
    return text


def read_text(text: bytes | str, file: str = "<input>", *, names_only: bool = False) -> Reading:
    """Parse and validate every document of one file (or each file of a :func:`bundle`),
    keeping going past documents with errors, malformed YAML included; only a text past
    the limits (:data:`MAX_BYTES`, :data:`MAX_DOCUMENTS`) stops early. ``names_only`` (what
    a delete reads): a document without a ``spec`` needs only its kind and name."""
    try:
        body = _decode(text, file)
    except ManifestError as exc:
        return Reading([], [], exc.issues, tuple(dict.fromkeys([file, *(i.file for i in exc.issues)])), complete=False)
    sources = _split(body, file)
    count = _Count()
    numbered: Counter[str] = Counter()  # documents per file name so far: a name given twice numbers on
    read: list[LoadedDocument | RefusedDocument] = []
    issues: list[ManifestIssue] = []
    complete = True
    for name, part in sources:
        reader = _FileReader(part, name, numbered[name], count, names_only)
        try:
            reader.read_all()
        except ManifestError as exc:  # a limit: nothing after it is read
            issues.extend(exc.issues)
            reader.complete = False
        read.extend(reader.read)
        issues.extend(reader.issues)
        complete = complete and reader.complete
        numbered[name] = reader.index
        if count.stopped:
            break
    files = tuple(dict.fromkeys(name for name, _ in sources))
    return Reading([d for d in read if isinstance(d, LoadedDocument)], [d for d in read if isinstance(d, RefusedDocument)],
                   in_order(issues + _check_unique(read), files), files, complete)


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


@dataclass
class _Count:
    """Documents met in one text (a file or a whole bundle), empty ones included so that
    a text of '---' lines stays bounded."""

    documents: int = 0
    stopped: bool = False  # MAX_DOCUMENTS passed: no more is read


#: a line that starts a YAML document. PyYAML ends whatever is open there (a scalar, a
#: quoted string, a bracket), so after malformed YAML reading can start again at one.
_DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n\x85\u2028\u2029]|\Z)", re.M)
_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # what PyYAML counts as a new line


def _json_tabs_as_spaces(text: str) -> str:
    """A JSON text indented with tabs (``jq --tab``, Go's ``json.MarshalIndent``), its tabs
    made spaces: PyYAML's scanner refuses a tab between tokens, where JSON allows it. Only
    a text JSON reads: a JSON string holds no tab, so each is whitespace between tokens and
    the text means the same, on the same lines; a YAML text's tabs are left for YAML to judge."""
    if "\t" not in text or text.lstrip()[:1] not in ("{", "["):
        return text
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past what it reads: YAML says why
        return text
    return text.replace("\t", " ")


class _FileReader:
    """One file's documents, loaded or refused, and its issues. The file is read as one
    stream; where its YAML is malformed, the document it is in is spoiled and the rest is
    read from the next '---' line, one document at a time (a PyYAML stream does not go on
    past an error; those after it seldom fail, so the first pass keeps the fast path)."""

    def __init__(self, text: str, file: str, index: int, count: _Count, names_only: bool = False) -> None:
        self.text, self.file, self.count = _json_tabs_as_spaces(text), file, count
        self.names_only = names_only  # a delete's documents: kind and name are enough
        self.index = index  # of the next document in the file
        self.first = count.documents  # documents met before this file
        self.read: list[LoadedDocument | RefusedDocument] = []
        self.issues: list[ManifestIssue] = []
        #: False once part of it could not be read: that part may define anything
        self.complete = True
        self._after: int | None = None  # index of the document just read, while looking past it

    def read_all(self) -> None:
        """Raises :class:`ManifestError` past :data:`MAX_DOCUMENTS`."""
        if not self.text or self._read_fast():
            return
        resume = self._read(0, len(self.text), 1, whole=True)
        if resume is None:
            return
        self.complete = False
        starts = [resume, *(m.start() for m in _DOCUMENT_START.finditer(self.text, resume + 1)), len(self.text)]
        line = 1 + self._breaks(0, resume)
        for start, end in zip(starts, starts[1:]):
            if start < end:
                self._read(start, end, line)
            line += self._breaks(start, end)

    def _read_fast(self) -> bool:
        """Read the whole file through libyaml (:func:`parsing.fast_loader`), a document at a
        time: True when it was read, False when nothing was taken from it and :meth:`_read`
        should read it instead, as where its YAML, or a value in it, is malformed (PyYAML's
        Python parser then says what is wrong in its own words, and reads on past it)."""
        loader = parsing.fast_loader(self.text)
        if loader is None:
            return False
        index, documents, read, issues = self.index, self.count.documents, len(self.read), len(self.issues)
        try:
            for raw in self._documents(loader):
                self._take(raw)
        except yaml.YAMLError:  # what was taken from this file goes: the Python parser reads it all
            self.index, self.count.documents = index, documents
            del self.read[read:], self.issues[issues:]
            return False
        finally:
            loader.dispose()
        return True

    def _breaks(self, start: int, end: int) -> int:
        return sum(1 for _ in _LINE_BREAK.finditer(self.text, start, end))

    def _read(self, start: int, end: int, line: int, whole: bool = False) -> int | None:
        """Read ``text[start:end]``, whose first line is ``line``. ``None`` when read to its
        end; else where to go on from: the next document start after the error (``end`` if
        none), or ``start`` when the ``whole`` file was refused before any of it was read."""
        text = self.text[start:end]
        try:
            loader = parsing.PythonLoader(text, line)  # the reader refuses control characters right here
        except yaml.reader.ReaderError as exc:
            if whole:  # nothing was read: read the file a document at a time, from its start
                return start
            at = line + self._breaks(start, start + exc.position)
            self._spoiled(at, f"malformed YAML: unacceptable character #x{exc.character:04x}: {exc.reason}")
            return end
        try:
            for raw in self._documents(loader):
                self._take(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            if isinstance(exc, parsing.TooDeep):
                message = f"document is nested deeper than {MAX_DEPTH} levels"
            else:
                message = f"malformed YAML: {getattr(exc, 'problem', None) or exc}"
                context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
                if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
                    message += f" ({context} at line {context_mark.line + 1})"
            self._spoiled(mark.line + 1 if mark is not None else None, message, self._after)
            if mark is None:
                return end
            # an error at a '---' line ends the document before it: go on from that line
            found = _DOCUMENT_START.search(self.text, max(start + mark.index, start + 1), end)
            return found.start() if found else end
        finally:
            loader.dispose()
        return None

    def _spoiled(self, line: int | None, message: str, after: int | None = None) -> None:
        """The document at ``line`` cannot be read; it keeps its index. ``after``: the error
        is text after document ``after`` with no '---' before it (a JSON object closed
        twice), that document's."""
        if after is not None:
            self.issues.append(ManifestIssue(self.file, after, "", line, message))
            return
        self.issues.append(ManifestIssue(self.file, self.index, "", line, message))
        self.index += 1

    def _met(self, node: yaml.Node) -> None:
        self.count.documents += 1
        if self.count.documents <= MAX_DOCUMENTS:
            return
        self.count.stopped = True
        line = node.start_mark.line + 1
        if self.first == 0:
            raise ManifestError([ManifestIssue(self.file, None, "", line, f"more than {MAX_DOCUMENTS} documents in one file")])
        raise ManifestError([ManifestIssue(self.file, None, "", line, f"more than {MAX_DOCUMENTS} documents in one apply, "
                                           f"{self.first} in the files before this one: apply the files in smaller groups")])

    def _documents(self, loader: yaml.composer.Composer) -> Iterator[_Raw]:
        self._after = None
        # check_node fails only on text right after a document with no '---' before it
        # (what follows a '---' fails in get_node): that text is the document's
        while loader.check_node():
            self._after = None
            node = loader.get_node()
            if node is None:
                continue
            if _is_empty(node):
                self._met(node)  # empty documents (e.g. between two '---') are counted, not numbered
                continue
            items = node if isinstance(node, yaml.SequenceNode) else _list_items(node)
            # a JSON array (or YAML list) of documents, or a list as `get -o yaml` prints it
            for item in items.value if items is not None else [node]:
                self._met(item)
                yield _walk(item, self.file, self.index)
                self._after = self.index
                self.index += 1

    def _take(self, raw: _Raw) -> None:
        line = raw.node.start_mark.line + 1
        result = raw.issues or validation.validate(raw.data, raw.walker, self.names_only)
        if isinstance(result, list):
            self.issues.extend(result)
            self.read.append(_refused(raw))
        else:
            self.read.append(LoadedDocument(self.file, raw.index, line, result, dict(raw.walker.lines)))


def manifest_files(target: pathlib.Path) -> list[pathlib.Path]:
    """A file, or every ``*.yaml``/``*.yml``/``*.json`` in a directory (sorted, not recursive),
    a link among them that leads to no file included: reading it says so."""
    if target.is_dir():
        # an entry listed that does not exist is a link that leads nowhere
        return sorted(p for p in target.iterdir() if p.suffix in (".yaml", ".yml", ".json") and (p.is_file() or not p.exists()))
    return [target]
