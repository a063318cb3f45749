"""The read-only web console at ``/ui``: fleet map, deployments, events and what-if.

Plain HTML and JavaScript modules shipped as package data (no build step, nothing fetched
from the internet): the base map is Natural Earth's 1:110m country borders, vendored in
``static/vendor`` (see its LICENSES.md). The page reads the same ``/v1`` API as the CLI with
the same bearer token, kept in the browser tab's sessionStorage; the files themselves hold
no data and are served without a token.
"""

from __future__ import annotations

import pathlib

import pycountry
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = pathlib.Path(__file__).parent / "static"


def _iso_codes() -> dict[str, str]:
    """ISO 3166 numeric code (the map's country ids) → alpha-2 (residency in manifests)."""
    return {c.numeric: c.alpha_2 for c in pycountry.countries}


def routes() -> list[BaseRoute]:
    codes = _iso_codes()

    async def to_index(request: object) -> Response:
        return RedirectResponse("/ui/", status_code=307)

    async def iso(request: object) -> Response:
        return JSONResponse(codes, headers={"cache-control": "max-age=86400"})

    return [
        Route("/ui", to_index, methods=["GET"]),
        Route("/ui/iso-countries.json", iso, methods=["GET"]),
        Mount("/ui", app=StaticFiles(directory=STATIC, html=True), name="console"),
    ]
