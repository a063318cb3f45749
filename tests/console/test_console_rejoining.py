"""After a control-plane restart, an edge site whose agent has not reconnected yet keeps its
replicas and is `Rejoining`: the console shows it amber (waiting), not red (lost), and
green again once its agent is back."""

from __future__ import annotations

import pathlib
import signal

import pytest

from orchestrator.testing import harness, manifests, onnx_models

from .test_console_browser import open_console

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITE = "edge-paris"
AMBER = "rgb(232, 163, 23)"  # console.css --wait


async def test_a_site_awaiting_its_agent_after_a_restart_is_amber_then_green(browser, tmp_path: pathlib.Path,  # type: ignore[no-untyped-def]
                                                                             screenshots: pathlib.Path) -> None:
    built = onnx_models.build_mlp(tmp_path / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    fleet_yaml = manifests.bundle(
        manifests.edge_site(SITE, country="FR", region="fr", lat=48.8566, lon=2.3522),
        manifests.onnx_model("intent", "intent.onnx", built.sha256),
        manifests.doc("ModelDeployment", "intent-fr", {"model": "intent", "replicas": {"min": 1, "max": 1},
                                                       "placement": {"residency": ["FR"], "tiers": ["edge"]}}),
    )
    where = {SITE: dict(country="FR", region="fr", lat=48.8566, lon=2.3522)}
    async with harness.serving_fleet(tmp_path, fleet_yaml, where, what="the replica in Paris",
                                     ready=lambda cp: any(e.healthy for e in cp.table.endpoints("intent"))) as fleet:
        old = fleet.cp
        assert old is not None
        ports = dict(port=int(old.http_url.rsplit(":", 1)[1]), agent_port=int(old.agent_target.rsplit(":", 1)[1]),
                     agent_join_port=int(old.agent_join_target.rsplit(":", 1)[1]) if old.agent_join_target else 0)
        agent = fleet.agents[SITE]
        agent.kill(signal.SIGSTOP)  # it cannot rejoin until it is let go
        try:
            await old.stop()
            cp = await fleet.start_control_plane(**ports)  # on the same addresses, so that the agent finds it again
            page, errors = await open_console(browser, cp.http_url)
            try:
                site = f"#map g.site[data-site={SITE}]"
                await page.wait_for_selector(f"{site}[data-health=Rejoining]", timeout=15_000)
                assert await page.eval_on_selector(f"{site} circle", "c => getComputedStyle(c).fill") == AMBER
                assert await page.eval_on_selector(f"{site}", "g => g.dataset.replicas") == "1"  # kept while it rejoins
                cell = page.locator("#sites-body tr", has_text=SITE).locator("td").nth(3)
                assert (await cell.inner_text(), await cell.get_attribute("class")) == ("Rejoining", "waiting")
                assert "1 rejoining" in await page.inner_text("#summary")
                await page.screenshot(path=str(screenshots / "console-rejoining.png"))
                agent.kill(signal.SIGCONT)
                await page.wait_for_selector(f"{site}[data-health=Healthy]", timeout=30_000)
                assert "rejoining" not in await page.inner_text("#summary")
                assert errors == []
            finally:
                await page.close()
        finally:
            agent.kill(signal.SIGCONT)
