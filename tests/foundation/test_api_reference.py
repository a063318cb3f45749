"""docs/api.md lists every route the control plane serves, and nothing it does not: an
integrator automating the API from their own tooling reads that page, not the code. The
routes are read from a real control plane's app, so a route added without its line (or a
line left for a route taken away) fails here."""

from __future__ import annotations

import re

from typing import Any

from starlette.routing import Mount, Route

from orchestrator.api import methods

from . import support

REFERENCE = support.REPO / "docs" / "api.md"
ROW = re.compile(r"^\| `((?:GET|POST|DELETE|HEAD)(?:, (?:GET|POST|DELETE|HEAD))*) (/[^`]*)`", re.M)


def _documented() -> set[tuple[str, str]]:
    return {(m, path) for methods_, path in ROW.findall(REFERENCE.read_text()) for m in methods_.split(", ") if m != "HEAD"}


def _served(control_plane: support.ServerThread) -> set[tuple[str, str]]:
    assert control_plane.cp is not None
    out: set[tuple[str, str]] = set()
    for route in control_plane.cp.app.routes:
        if isinstance(route, Mount):  # the console's files
            out.add(("GET", f"{route.path}/{{file}}"))
        elif isinstance(route, Route) and route.methods:  # not the 404 of unknown paths (methods None)
            out |= {(m, route.path) for m in route.methods if m != "HEAD"}
        else:
            assert isinstance(route, methods.CatchAll) and route.methods is None, route
    return out


def test_the_reference_lists_every_route_the_control_plane_serves(control_plane: support.ServerThread) -> None:
    served, documented = _served(control_plane), _documented()
    assert not served - documented, f"served, not in docs/api.md: {sorted(served - documented)}"
    assert not documented - served, f"in docs/api.md, not served: {sorted(documented - served)}"


#: The line of a route's refusal of a parameter it does not take, naming those it does.
TAKES = re.compile(r"unknown query parameter .*: [^:]* takes (.*)$")


def test_the_reference_names_every_query_parameter_a_route_takes(api: Any) -> None:
    """A route's row names each query parameter the route takes (``?site``): one added to the
    code without its line is found by no integrator. Each GET route of no path parameter is
    asked for a parameter it cannot take, and its refusal names those it does."""
    rows = {path: line for line in REFERENCE.read_text().splitlines()
            for methods_, path in ROW.findall(line) if "GET" in methods_.split(", ")}
    checked = 0
    for path, line in sorted(rows.items()):
        if "{" in path:
            continue
        refused = api.get(path, params={"no-such-parameter": "1"})
        takes = TAKES.search(refused.json().get("error", "")) if refused.status_code == 400 else None
        if takes is None or takes.group(1) == "none":
            continue
        checked += 1
        names = [n.strip() for n in takes.group(1).split(",")]
        missing = [n for n in names if f"?{n}" not in line]
        assert not missing, f"{path} takes {missing}, which its row in docs/api.md does not name"
    assert checked >= 3  # the lists and the event log at least
