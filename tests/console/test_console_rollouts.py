"""The Deployments tab shows a version rollout as ``get modeldeployments`` does: how many
sites are upgraded, the canary step open, the sites a ``replaceWhenFull`` rollout left
serving no version meanwhile, and, when it halted, which site failed and why, in the row
itself (not only in a tooltip), within the tab however long the agent's message.

The deployment is served to the page through Playwright's routing, its ``rollout`` block
made by the reconciler's own ``Rollout.status()`` and its halt by the agent's own signature
check, so each state shows without agents to roll; the rest of the API is a real control
plane's.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import pytest

from edge_agent import signature
from orchestrator.reconciler import rollout

from .conftest import console_page

pytestmark = pytest.mark.asyncio(loop_scope="module")

SHA = "5e1f" * 16
# onnxruntime's kind of message: a path with no space in it to break the line at
PATH = "/var/lib/edgeplane-agent/artifacts/sha256-" + SHA + "/intent.onnx"


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]


def deployments() -> list[dict[str, Any]]:
    refused = signature.mismatch([Tensor("input", "FP32", (1, 8))], [], [Tensor("input", "FP32", (1, 16))], [])
    assert refused is not None
    halted = rollout.Rollout(SHA, upgraded=("edge-paris",), switching=("edge-lyon",), waiting=("edge-berlin", "edge-madrid"),
                             failed=(("edge-lyon", f"{PATH}: {refused}; the version it replaced was loaded again"),),
                             replacing=("edge-lyon",))
    canary = rollout.Rollout(SHA, upgraded=(), switching=("edge-paris",), waiting=("edge-lyon", "edge-berlin", "edge-madrid"), step=25)
    return [
        {"metadata": {"name": "intent-eu"}, "spec": {"model": "intent", "placement": {}},
         "status": {"phase": "Failing", "replicas": 4, "readyReplicas": 3, "reason": halted.status()["halted"], "rollout": halted.status()}},
        {"metadata": {"name": "fields-fr"}, "spec": {"model": "fields", "placement": {}},
         "status": {"phase": "Progressing", "replicas": 4, "readyReplicas": 4, "reason": "", "rollout": canary.status()}},
    ]


async def test_a_rollout_s_canary_step_replacing_sites_and_halt_show_in_the_deployments_tab(browser, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    async with console_page(browser, tmp_path, {"**/v1/modeldeployments": {"kind": "ModelDeployment", "items": deployments()}}) as (page, errors, cp):
        await page.goto(f"{cp.http_url}/ui/")
        await page.click("nav button[data-tab=deployments]")
        await page.wait_for_selector("#deployments-body tr[data-deployment=intent-eu]", timeout=30_000)
        halted = page.locator("#deployments-body tr[data-deployment=intent-eu] td").nth(4)
        text = await halted.inner_text()
        assert text.startswith("1/4 upgraded, replacing on edge-lyon\nHALTED: "), text
        # which site, which version and why, as the status says it: not only in the row's tooltip
        assert f"edge-lyon could not load version {SHA[:12]}: {PATH}: the model file does not match the variant's declared inputs" in text, text
        assert "the version it replaced was loaded again" in text, text
        canary = await page.locator("#deployments-body tr[data-deployment=fields-fr] td").nth(4).inner_text()
        assert canary == "0/4 upgraded, canary 25%", canary
        # the longest reason wraps within the tab: the table does not run off its side
        assert await page.eval_on_selector("#tab-deployments", "t => t.scrollWidth <= t.clientWidth"), "the deployments table overflows its tab"
