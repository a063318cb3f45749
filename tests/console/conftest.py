"""A control plane with four edge agents and headless Chromium, for the console tests.

Chromium comes from the Debian package (``make system-packages`` installs it; ``make test`` runs
that first) and is driven by Playwright for Python through ``executable_path``: Playwright's
own browser download is never used. Without a Chromium binary the browser tests skip and
say why.

The page runs under its Content-Security-Policy, which has no 'unsafe-eval': Playwright
evaluates a ``wait_for_function`` predicate given as an expression with eval() while it
polls, and the page refuses it, so predicates are written as functions (``"() => ..."``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import pytest_asyncio

from orchestrator.testing import harness, manifests, onnx_models

AGENTS = {
    "edge-paris": dict(country="FR", region="fr", lat=48.8566, lon=2.3522),
    "edge-lyon": dict(country="FR", region="fr", lat=45.764, lon=4.8357),
    "edge-berlin": dict(country="DE", region="de", lat=52.52, lon=13.405),
    "edge-madrid": dict(country="ES", region="es", lat=40.4168, lon=-3.7038),
}


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def fleet_yaml(sha256: str) -> str:
    return manifests.bundle(
        *(manifests.edge_site(name, **where) for name, where in AGENTS.items()),
        manifests.onnx_model("intent", "intent.onnx", sha256),
        manifests.onnx_model("fields", "intent.onnx", sha256),
        manifests.doc("ModelDeployment", "intent-eu", {
            "model": "intent", "replicas": {"min": 3, "max": 3}, "placement": manifests.spread_by_site(residency=["EU"], tiers=["edge"]),
            "demand": [{"lat": 48.85, "lon": 2.35, "rps": 50}, {"lat": 40.4, "lon": -3.7, "rps": 20}, {"lat": 52.5, "lon": 13.4, "rps": 20}]}),
        manifests.doc("ModelDeployment", "fields-fr", {
            "model": "fields", "replicas": {"min": 1, "max": 1}, "placement": {"residency": ["FR"], "tiers": ["edge"]},
            "demand": [{"lat": 45.76, "lon": 4.84, "rps": 10}], "autoscaling": {"targetInflight": 8}}),
    )


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Where screenshots go: $EDGEPLANE_CONSOLE_SCREENSHOTS (docs/img for the docs), else a temp dir."""
    target = os.environ.get("EDGEPLANE_CONSOLE_SCREENSHOTS")
    path = pathlib.Path(target) if target else tmp_path_factory.mktemp("screens")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine and `make system-packages` (apt-get install chromium) could not install it")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            await b.close()


def _answering(body: str) -> Any:
    """A Playwright route handler answering ``body`` as JSON (one argument: Playwright
    passes the request too to a handler that takes two)."""
    async def fulfil(route: Any) -> None:
        await route.fulfill(status=200, content_type="application/json", body=body)
    return fulfil


@contextlib.asynccontextmanager
async def console_page(browser: Any, root: pathlib.Path, answers: Mapping[str, Any]) -> AsyncIterator[tuple[Any, list[str], Any]]:
    """A page of a real control plane's console (no agents), the API paths of ``answers``
    (a Playwright route pattern, ``**/v1/sites``) answered with that JSON instead, so a state
    shows that no fleet here could be put in; the page, the errors it raised and the control
    plane."""
    f = harness.Fleet(root)
    try:
        cp = await f.start_control_plane()
        page = await browser.new_page(viewport={"width": 1440, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            for pattern, answer in answers.items():
                await page.route(pattern, _answering(json.dumps(answer)))
            yield page, errors, cp
        finally:
            await page.close()
    finally:
        await f.stop()


def intent_and_fields_ready(cp: Any) -> bool:
    return len([e for e in cp.table.endpoints("intent") if e.healthy]) == 3 and len(cp.table.endpoints("fields")) == 1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("console")
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    async with harness.serving_fleet(root, fleet_yaml(built.sha256), AGENTS, ready=intent_and_fields_ready, timeout=120,
                                     what="3 intent endpoints and the fields endpoint") as f:
        yield f
