"""A manifest document checked against its kind's schema, with every error said in terms
of the text: at the field's path and line, an unknown field told the known one it is
closest to, unquoted YAML values that were read as another type pointed out, pattern
mismatches explained.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol

import pydantic

from edgeplane_proto import lookalike
from orchestrator.manifests import fields, schema
from orchestrator.manifests.errors import ManifestIssue

Path = tuple[str | int, ...]


class Walked(Protocol):
    """What the walk of a document's text knows: where it is and where each field was written."""

    file: str
    index: int
    #: field path -> the text of a scalar written without quotes
    unquoted: dict[Path, str]

    def line_of(self, path: Path) -> int | None: ...


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


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
#: Those that no character outside ASCII matches: a value one refuses is told its first such
#: character (:func:`edgeplane_proto.lookalike.explain`); a pattern with ``\w`` or ``\S`` takes any script.
_ASCII_PATTERNS = {schema.NAME_PATTERN, schema.LABEL_KEY_PATTERN, schema.LABEL_VALUE_PATTERN,
                   schema.SHA256_PATTERN, schema.PERCENT_PATTERN}


#: Written by the control plane, never by a manifest: apply ignores them, so what `get`
#: prints can be applied again (``metadata.resourceVersion`` then makes it conditional).
SERVER_SET = {"status"}
SERVER_SET_METADATA = {"generation", "creationTimestamp"}


def without_server_set(data: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in data.items() if k not in SERVER_SET}
    if isinstance(data.get("metadata"), dict):
        data["metadata"] = {k: v for k, v in data["metadata"].items() if k not in SERVER_SET_METADATA}
    return data


def validate(data: Any, walker: Walked, names_only: bool = False) -> schema.Document | schema.Reference | list[ManifestIssue]:
    """``data``, the document a walk of its text made, as its kind's schema reads it; or its
    issues, one per field, each at the field's line. ``names_only`` (a delete's documents):
    one without a ``spec`` is read as a :class:`schema.Reference`, its kind and name."""
    file, index = walker.file, walker.index

    def issue(path: Path, message: str) -> ManifestIssue:
        return ManifestIssue(file, index, format_path(path), walker.line_of(path), message)

    if not isinstance(data, dict):
        return [issue((), f"a document must be a mapping with apiVersion/kind/metadata/spec, got {type(data).__name__}")]
    kind = data.get("kind")
    reference = names_only and "spec" not in data
    if data.get("apiVersion") != schema.API_VERSION and not (reference and "apiVersion" not in data):
        return [issue(("apiVersion",), f"apiVersion must be {schema.API_VERSION!r}, got {data.get('apiVersion')!r}")]
    doc_type = schema.DOC_TYPES.get(kind) if isinstance(kind, str) else None
    if doc_type is None:
        said = "kind is missing" if "kind" not in data else "kind is empty" if kind is None else f"unknown kind {kind!r}"
        return [issue(("kind",), f"{said}; expected one of {', '.join(schema.KINDS)}")]
    if reference:
        doc_type = schema.Reference
    data = without_server_set(data)
    try:
        return doc_type.model_validate(data, context=schema.MANIFEST)  # type: ignore[return-value]
    except pydantic.ValidationError as exc:
        messages: dict[Path, list[str]] = {}
        meant: set[Path] = set()  # a required field a misspelt one was taken for: not also said to be missing
        for err in exc.errors(include_url=False):
            loc = _data_path(data, tuple(err["loc"]), err["type"] == "missing")
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown field {loc[-1]!r}"
                if isinstance(loc[-1], str) and (field := _meant(doc_type, data, loc)) is not None:
                    message += f" (did you mean {field!r}?)"
                    meant.add((*loc[:-1], field))
            elif err["type"] == "missing":
                message = _MISSING
            elif err["type"] in fields.MAPPING_TYPE_ERRORS:
                message = fields.mapping_wanted(doc_type, loc, err["type"], err.get("input"))
            elif err["type"] == "string_type" and loc in walker.unquoted:
                message = _quote_hint(walker.unquoted[loc], err.get("input"))
            elif err["type"] in ("int_type", "float_type") and loc and (hint := _number_hint(loc[-1], err.get("input"))):
                message = f"{message}, {hint}"
            elif err["type"] == "string_pattern_mismatch":
                pattern = str((err.get("ctx") or {}).get("pattern"))
                hint = _PATTERN_HINTS.get(pattern, "does not match the expected format")
                unseen = lookalike.explain(err.get("input")) if pattern in _ASCII_PATTERNS else ""
                message = f"{err.get('input')!r} is not valid: {hint}{unseen}"
            if message not in messages.setdefault(loc, []):
                messages[loc].append(message)
        # one issue per field: a value failing every member of a union (name or map,
        # count or percentage) gets the members' reasons joined
        return [issue(loc, "; or ".join(msgs)) for loc, msgs in messages.items()
                if not (loc in meant and msgs == [_MISSING])]


_MISSING = "required field is missing"


def _meant(doc_type: type[pydantic.BaseModel], data: dict[str, Any], loc: Path) -> str | None:
    """The field of the object holding the unknown field at ``loc`` that it is closest to."""
    given = _node(data, loc[:-1])
    return fields.closest(str(loc[-1]), fields.objects_at(doc_type, loc[:-1]), list(given) if isinstance(given, dict) else [])


def _node(data: Any, path: Path) -> Any:
    for part in path:
        data = data[part] if _holds(data, part) else None
    return data


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


#: A Kubernetes quantity (``500m``, ``16Gi``, ``64G``): a number and its unit's size.
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m|k|K|M|G|T|Ki|Mi|Gi|Ti)")
_QUANTITY_SCALE = {"m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                   "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}
#: The unit of a number field, by how its name ends, and that unit's size in bytes.
_FIELD_UNITS = {"MiB": 2.0**20, "GiB": 2.0**30}
#: A number with an exponent that YAML 1.1 (PyYAML) reads as text: no '.' or no sign (``1e3``, ``1.5e3``).
_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _number_hint(field: str | int, value: Any) -> str | None:
    """What a number field was given instead, as the user wrote it, and what to write: a
    Kubernetes quantity (``cpu: 500m``, ``memoryMiB: 16Gi``), a number in quotes, an exponent
    YAML read as text, a whole number written as a float for a count."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return f"not {value!r}: write it as digits, {int(value)}"
    if not isinstance(value, str):
        return None
    if (quantity := _QUANTITY.fullmatch(value)) is not None:
        amount = float(quantity.group(1)) * _QUANTITY_SCALE[quantity.group(2)]
        if field == "cpu" and quantity.group(2) == "m":
            return f"not {value!r}: cpu counts cores, so {value} is {amount:g}"
        unit = next((u for u in _FIELD_UNITS if isinstance(field, str) and field.endswith(u)), None)
        if unit is not None and quantity.group(2) != "m":
            return f"not {value!r}: {field} is in {unit}, so {value} is {amount / _FIELD_UNITS[unit]:g}"
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number):  # 'nan' and 'inf' are text to YAML, as are 1e999 and a quoted '.inf'
        return None
    if _EXPONENT.fullmatch(value) and not re.search(r"\.[0-9]*[eE][-+]", value):
        mantissa, exponent = re.split("[eE]", value)
        as_yaml = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent if exponent[0] in '+-' else '+' + exponent}"
        digits = f"{int(number)} or " if number.is_integer() and abs(number) < 1e16 else ""
        return f"not the text {value!r}: YAML reads an exponent without a '.' and a sign as text: write {digits}{as_yaml}"
    return f"not the text {value!r}: write it without quotes"


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
