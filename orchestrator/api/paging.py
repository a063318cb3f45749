"""Pages of the control API's lists, as Kubernetes pages its own: ``limit`` and ``continue``.

A list of every Site of a 5,000-site fleet is megabytes, built and sent whole at every ask;
a caller that wants less asks ``?limit=N`` and gets at most N items, with
``metadata.continue`` (an opaque token) while more remain: the next page is
``?limit=N&continue=TOKEN``. A page starts after the last key of the one before (keyset
paging on the list's own order), so pages never skip or repeat an object that stays, and no
token expires; an object created or deleted between two pages is listed or not by where its
key falls, as with a Kubernetes list whose snapshot has expired. A list asked without
``limit`` is answered whole, as before. A parameter a route does not read is refused (400,
naming it): read as nothing, ``?limit=10`` answered the whole fleet as if it were the page.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from starlette import datastructures

from orchestrator.api import problems
from orchestrator.store import values

T = TypeVar("T")

#: The most items a page may ask for (a larger ``limit`` is refused, not cut silently).
MAX_LIMIT = 10_000


class BadPage(problems.BadParameter):
    """A ``limit`` or ``continue`` that cannot be read, or a parameter the route does not take."""


@dataclass(frozen=True)
class Page:
    limit: int | None = None  # None: the whole list
    after: tuple[str, ...] | None = None  # the key of the last item of the page before


def parse(query: Mapping[str, str], list_name: str, takes: Collection[str] = ()) -> Page:
    """The page ``query`` asks of the list ``list_name`` (which a token must name); ``takes``:
    the route's other parameters. Anything else is refused."""
    refuse_unknown(query, ["limit", "continue", *sorted(takes)])
    limit = whole_number(query["limit"], "limit", 1, MAX_LIMIT) if "limit" in query else None
    after = None
    if token := query.get("continue"):
        if limit is None:
            raise BadPage("continue is given without limit: ask the next page with the limit of the one before", "continue",
                          problems.Reason.BAD_REQUEST)
        after = _read_token(token, list_name)
    return Page(limit, after)


def whole_number(text: str, name: str, low: int, high: int) -> int:
    """The query parameter ``name``'s ``text`` as a whole number from ``low`` to ``high``, else
    :class:`BadPage` naming it. ASCII digits only: str.isdigit() also takes '²' (which int()
    refuses) and '٣' (which int() reads as 3), and int() refuses past 4,300 digits."""
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(high))) or not low <= int(text) <= high:
        raise BadPage(f"{name} must be a whole number from {low:,} to {high:,}, not {text[:40]!r}", name)
    return int(text)


def refuse_unknown(query: Collection[str], takes: Sequence[str], route: str = "this list") -> None:
    """Refuse (:class:`BadPage`) a parameter of ``query`` that is not in ``takes``, the
    route's parameters: read as nothing, a misspelt filter answered everything unfiltered;
    and one given twice (:func:`refuse_repeated`)."""
    refuse_repeated(query)
    unknown = sorted(set(query) - set(takes))
    if unknown:
        raise unknown_parameters(unknown, f"{route} takes {', '.join(takes) or 'none'}")


def refuse_repeated(query: Collection[str]) -> None:
    """Refuse (:class:`BadPage`) a parameter given more than once: which value counts is each
    server's and proxy's own rule (this one read the last), so ``?dryRun=true&dryRun=false``
    applied for real where a proxy before it saw a dry run. ``query``: a request's
    ``QueryParams``, which keeps every value (a plain mapping holds one of each)."""
    items = query.multi_items() if isinstance(query, datastructures.QueryParams) else []
    counts = collections.Counter(name for name, _ in items)
    if repeated := sorted(name for name, n in counts.items() if n > 1):
        said = ", ".join(f"{name!r} is given {counts[name]} times" for name in repeated)
        raise BadPage(f"query parameter {said}; give each once", problems.one(repeated), problems.Reason.REPEATED_PARAMETER)


def unknown_parameters(names: list[str], takes: str) -> BadPage:
    """The refusal of the query parameters ``names`` (sorted) that a route does not take;
    ``takes`` says what it does ("this route takes dryRun and file")."""
    return BadPage(f"unknown query parameter {', '.join(map(repr, names))}: {takes}", problems.one(names), problems.Reason.UNKNOWN_PARAMETER)


def continue_token(list_name: str, key: Sequence[str]) -> str:
    raw = json.dumps({"list": list_name, "after": list(key)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_token(token: str, list_name: str) -> tuple[str, ...]:
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: JSON nested past the parser's depth
        doc = None
    if not isinstance(doc, dict) or not isinstance(after := doc.get("after"), list) or not all(isinstance(k, str) for k in after):
        raise BadPage("continue is not a token a page of this list gave (metadata.continue)", "continue")
    if doc.get("list") != list_name:
        raise BadPage(f"continue is a token of the list of {doc.get('list')}, not of {list_name}", "continue")
    if any(values.storable(k) != k for k in after):  # a NUL or a lone surrogate: no key the store holds, nor can be asked for
        raise BadPage("continue is not a token a page of this list gave (metadata.continue)", "continue")
    return tuple(after)


def page_of(items: Sequence[T], page: Page, key: Callable[[T], tuple[str, ...]]) -> tuple[list[T], bool]:
    """The items of ``page`` from the whole list ``items`` (in ``key`` order, byte-wise as
    the store sorts: str compares code points, in UTF-8's order), and whether more follow."""
    after = page.after
    if after is not None and items and len(after) != len(key(items[0])):
        raise BadPage("continue is not a token a page of this list gave (metadata.continue)", "continue")
    rest = list(items) if after is None else [i for i in items if key(i) > after]
    return (rest, False) if page.limit is None else (rest[:page.limit], len(rest) > page.limit)


def metadata(page: Page, list_name: str, more: bool, last: Sequence[str] | None) -> dict[str, str] | None:
    """A paged answer's ``metadata``: ``continue`` while more remain; None when not paged."""
    if page.limit is None:
        return None
    return {"continue": continue_token(list_name, last)} if more and last is not None else {}
