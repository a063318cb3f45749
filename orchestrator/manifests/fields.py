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
