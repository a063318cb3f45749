"""The fields an object of a manifest takes, found in the schema at the object's path.

An error is said in the words of the text, not of the models behind it: a misspelt field
is told the field of that same object it is closest to, and an object left empty is told
the fields it needs, never the class that reads it. The schema is walked only when an
error is said, so reading a valid manifest costs nothing more.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pydantic

Path = tuple[str | int, ...]

#: How close a misspelt field must be to a known one (difflib's ratio) for it to be suggested.
CLOSE = 0.75


def objects_at(root: type[pydantic.BaseModel], path: Path) -> list[type[pydantic.BaseModel]]:
    """The models that may read the object at ``path`` of a document ``root`` reads: one,
    or several where a union holds more than one (none where ``path`` leads to no object)."""
    types_here: list[Any] = [root]
    for part in path:
        types_here = [t for here in types_here for t in _step(here, part)]
    found = [m for t in types_here for m in _members(t) if _is_model(m)]
    return list(dict.fromkeys(found))


def names(model: type[pydantic.BaseModel]) -> list[str]:
    """Every field ``model`` takes, as a manifest writes it (its alias where it has one)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def required(model: type[pydantic.BaseModel]) -> list[str]:
    """The fields ``model`` cannot do without, as a manifest writes them."""
    return [info.alias or name for name, info in model.model_fields.items() if info.is_required()]


def closest(unknown: str, models: list[type[pydantic.BaseModel]], given: Sequence[str] = ()) -> str | None:
    """The field of ``models`` that ``unknown`` is most likely a misspelling of, unless it
    is already ``given`` in the same object; ``None`` when none is close."""
    known = [n for n in dict.fromkeys(n for m in models for n in names(m)) if n not in given]
    match = difflib.get_close_matches(unknown, known, n=1, cutoff=CLOSE)
    return match[0] if match else None


#: pydantic's errors for a value that is no mapping, which name the class that reads it
MAPPING_TYPE_ERRORS = ("model_type", "model_attributes_type", "dict_type")
#: A value's type as YAML (and JSON) name it.
_YAML_TYPES = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number", float: "a number"}


def mapping_wanted(root: type[pydantic.BaseModel], loc: Path, error: str, value: Any) -> str:
    """What the object at ``loc`` (or a map of key: value pairs, for a ``dict_type``
    ``error``) needs that ``value`` is not, in the words of the text: pydantic names the
    class that reads it ("a valid dictionary or instance of SiteSpec")."""
    models = None if error == "dict_type" else objects_at(root, loc)
    label = _label(loc)
    needed: list[str] = []
    if models is None:
        content = "key: value pairs"
    elif len(models) == 1:
        needed = required(models[0])
        content = f"its fields ({_listing(needed or names(models[0]))})"
    else:
        content = "its fields"
    if value is None:
        return f"{label} is empty; it needs {_listing(needed, 'and')}" if needed else f"{label} is empty; give {content} or leave it out"
    wanted = f"with {_listing(needed, 'and')}" if needed else "of key: value" if models is None else f"of {content}"
    return f"Input should be a mapping {wanted}, not {_YAML_TYPES.get(type(value), f'a {type(value).__name__}')}"


def _listing(names: list[str], last: str = ",") -> str:
    """``a, b and c`` (``last`` "and") or ``a, b, c``; past four names, the first four and '...'."""
    if len(names) > 4:
        return ", ".join(names[:4]) + ", ..."
    if last == "and" and len(names) > 1:
        return f"{', '.join(names[:-1])} and {names[-1]}"
    return ", ".join(names)


def _label(loc: Path) -> str:
    """The name of what ``loc`` holds, from its last field on: ``spec``, ``variants[0]``."""
    out = ""
    for part in loc[max((i for i, part in enumerate(loc) if isinstance(part, str)), default=0):]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out or "it"


def _members(annotation: Any) -> Iterator[Any]:
    """``annotation`` without ``Annotated`` and ``Optional``: each member of a union."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _members(typing.get_args(annotation)[0])
    elif origin is typing.Union or origin is types.UnionType:
        for member in typing.get_args(annotation):
            yield from _members(member)
    else:
        yield annotation


def _step(annotation: Any, part: str | int) -> Iterator[Any]:
    """The types of what ``part`` (a field, a list index, a map key) holds in a value of ``annotation``."""
    for member in _members(annotation):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if _is_model(member) and isinstance(part, str):
            yield from (info.annotation for name, info in member.model_fields.items() if part in (name, info.alias))
        elif isinstance(origin, type) and issubclass(origin, Mapping) and isinstance(part, str) and len(args) == 2:
            yield args[1]
        elif origin is tuple and isinstance(part, int) and args:
            yield args[0] if len(args) == 2 and args[1] is Ellipsis else args[part] if part < len(args) else None
        elif isinstance(origin, type) and issubclass(origin, Sequence) and isinstance(part, int) and args:
            yield args[0]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)
