"""Table tests of the API lists' pages (``limit`` and ``continue``), as pure functions."""

from __future__ import annotations

import base64

import pytest

from orchestrator.api import paging

ROWS = [("d1", "edge-a", "v"), ("d1", "edge-b", "v"), ("d1", "edge-b", "w"), ("d2", "edge-a", "v"), ("é", "edge-a", "v")]


def pages(rows: list[tuple[str, str, str]], limit: int) -> list[list[tuple[str, str, str]]]:
    """Every page of ``rows``, following the tokens as a client does."""
    out, query = [], {"limit": str(limit)}
    for _ in range(len(rows) + 1):
        page = paging.parse(query, "placements")
        items, more = paging.page_of(rows, page, lambda r: r)
        out.append(items)
        meta = paging.metadata(page, "placements", more, items[-1] if items else None)
        assert meta is not None
        if "continue" not in meta:
            return out
        query = {"limit": str(limit), "continue": meta["continue"]}
    raise AssertionError("the pages did not end")


@pytest.mark.parametrize("limit, sizes", [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (5, [5]), (6, [5]), (10_000, [5])])
def test_pages_cover_the_list_once_in_order(limit: int, sizes: list[int]) -> None:
    got = pages(ROWS, limit)
    assert [len(p) for p in got] == sizes and [r for p in got for r in p] == ROWS


def test_a_page_goes_on_after_its_last_key_whatever_changed_before_it() -> None:
    first = paging.parse({"limit": "2"}, "placements")
    items, more = paging.page_of(ROWS, first, lambda r: r)
    assert more
    token = paging.metadata(first, "placements", more, items[-1])["continue"]  # type: ignore[index]
    changed = [("a", "new", "v"), *ROWS[1:]]  # a row before the page's end deleted, another one created there
    rest, more = paging.page_of(changed, paging.parse({"limit": "10", "continue": token}, "placements"), lambda r: r)
    assert rest == ROWS[2:] and not more


def test_without_limit_the_whole_list_and_no_metadata() -> None:
    page = paging.parse({}, "Site")
    assert paging.page_of(ROWS, page, lambda r: r) == (ROWS, False) and paging.metadata(page, "Site", False, None) is None


@pytest.mark.parametrize("query, takes, says", [
    ({"limt": "2"}, (), "unknown query parameter 'limt': this list takes limit, continue"),
    ({"limit": "2", "x": "1", "a": "2"}, ("watch",), "unknown query parameter 'a', 'x': this list takes limit, continue, watch"),
    ({"limit": "-1"}, (), "limit must be a whole number from 1 to 10,000, not '-1'"),
    ({"limit": "10001"}, (), "limit must be a whole number from 1 to 10,000"),
    ({"limit": "²"}, (), "limit must be a whole number from 1 to 10,000, not '²'"),  # a digit to str.isdigit(), not to int()
    ({"limit": "٣"}, (), "limit must be a whole number from 1 to 10,000, not '٣'"),  # int() reads it as 3
    ({"limit": "1" * 5000}, (), "limit must be a whole number from 1 to 10,000, not '1111"),  # past int()'s digits
    ({"limit": " 3"}, (), "limit must be a whole number"),
    ({"limit": "1_0"}, (), "limit must be a whole number"),
    ({"limit": "1", "continue": "%%%"}, (), "continue is not a token"),
    ({"limit": "1", "continue": paging.continue_token("Model", ["m"])}, (), "token of the list of Model, not of placements"),
    ({"continue": paging.continue_token("placements", ["d", "s", "v"])}, (), "continue is given without limit"),
])
def test_a_page_that_cannot_be_read_is_refused_saying_why(query: dict[str, str], takes: tuple[str, ...], says: str) -> None:
    with pytest.raises(paging.BadPage, match=None) as refused:
        paging.parse(query, "placements", takes)
    assert says in str(refused.value)


def test_a_token_of_another_shape_is_refused() -> None:
    page = paging.parse({"limit": "1", "continue": paging.continue_token("placements", ["only-one-key"])}, "placements")
    with pytest.raises(paging.BadPage):
        paging.page_of(ROWS, page, lambda r: r)


def test_a_token_of_json_nested_past_the_parser_s_depth_is_refused() -> None:
    """json.loads raises RecursionError, not ValueError, for an array nested too deep: a
    crafted token of 2,000 '[' was a 500 on every paged list."""
    token = base64.urlsafe_b64encode(b"[" * 2000).decode().rstrip("=")
    with pytest.raises(paging.BadPage, match="continue is not a token"):
        paging.parse({"limit": "1", "continue": token}, "sites")
