"""Remote artifact URLs are limited to the configured hosts; local ones to artifact roots."""

from __future__ import annotations

import pathlib

import httpx
import pytest

from orchestrator.artifacts import catalog
from orchestrator.testing import harness, loopback, manifests

SHA = "0" * 64


@pytest.mark.parametrize(
    "allowed, uri, ok",
    [
        ((), "https://anywhere.example/m.onnx", True),
        (("models.example.com",), "https://models.example.com/m.onnx", True),
        (("models.example.com",), "https://MODELS.example.com:8443/m.onnx", True),
        (("models.example.com",), "https://evil.example.net/m.onnx", False),
        (("models.example.com",), "https://models.example.com.evil.net/m.onnx", False),
        ((".example.com",), "https://eu.models.example.com/m.onnx", True),
        ((".example.com",), "https://example.com.evil.net/m.onnx", False),
    ],
)
def test_remote_hosts(allowed: tuple[str, ...], uri: str, ok: bool, tmp_path: pathlib.Path) -> None:
    cat = catalog.ArtifactCatalog((tmp_path,), "http://cp", allowed_hosts=allowed)
    if ok:
        assert cat.register(uri, SHA) == uri
    else:
        with pytest.raises(catalog.ArtifactError, match="not an allowed artifact host"):
            cat.register(uri, SHA)


def test_file_uris_outside_the_roots_are_refused(tmp_path: pathlib.Path) -> None:
    cat = catalog.ArtifactCatalog((tmp_path / "root",), "http://cp")
    with pytest.raises(catalog.ArtifactError, match="outside the allowed artifact roots"):
        cat.register("file:///etc/passwd", SHA)
    with pytest.raises(catalog.ArtifactError, match="must not name a host"):
        cat.register("file://server/share/m.onnx", SHA)


@pytest.mark.parametrize("allowed", [("models.example.com",), ()], ids=["allowed-hosts", "any-host"])
@pytest.mark.parametrize("uri", ["file:///srv/models/a%00b.onnx", "http://[::1/m.onnx", "https://models.example.com:x/m.onnx"],
                         ids=["nul-in-file-path", "unparsable-host", "unparsable-port"])
def test_a_uri_that_cannot_be_parsed_is_an_artifact_error(tmp_path: pathlib.Path, uri: str, allowed: tuple[str, ...]) -> None:
    """Stored before apply refused such URIs: the reconciler shows an ArtifactError on that
    Model's variant, where any other exception would fail the whole pass for every Model, and
    no agent or replica is handed a URI it cannot download, whatever hosts are allowed."""
    cat = catalog.ArtifactCatalog((tmp_path,), "http://cp", allowed_hosts=allowed)
    with pytest.raises(catalog.ArtifactError, match="not a usable artifact URI"):
        cat.register(uri, SHA)


def test_a_remote_uri_that_names_no_host_is_an_artifact_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(catalog.ArtifactError, match="names no host"):
        catalog.ArtifactCatalog((tmp_path,), "http://cp").register("https:///m.onnx", SHA)


FLEET = manifests.bundle(
    manifests.edge_site("edge-x", "FR", 48.8, 2.3),
    manifests.onnx_model("remote", "https://evil.example.net/m.onnx", SHA, variant="v"),
    manifests.doc("ModelDeployment", "remote-dep", {"model": "remote", "placement": {"tiers": ["edge"]}}),
)


@pytest.mark.asyncio
async def test_a_disallowed_host_is_never_assigned_and_status_says_why(tmp_path: pathlib.Path) -> None:
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(artifact_hosts=("models.example.com",))
        await fleet.start_agent("edge-x", country="FR", lat=48.8, lon=2.3)
        async with httpx.AsyncClient(base_url=cp.http_url) as http:
            assert (await http.post("/v1/apply", content=FLEET)).status_code == 200
        await harness.wait_until(lambda: "not an allowed artifact host" in (cp.store.get("ModelDeployment", "remote-dep").status.get("reason") or ""),
                                 15, what="the refusal in the status")
        assigned = cp.hub.assignments("edge-x")
        assert assigned is None or not assigned.assignments
    finally:
        await fleet.stop()


@pytest.mark.asyncio
async def test_an_agent_follows_no_redirect_to_a_host_not_allowed(tmp_path: pathlib.Path) -> None:
    """The URL the control plane checked is only where a download starts: the allowed hosts
    go with the assignment, and the agent refuses a redirect elsewhere, naming the host."""
    fleet = harness.Fleet(tmp_path)
    try:
        cp = await fleet.start_control_plane(artifact_hosts=("127.0.0.1",))
        await fleet.start_agent("edge-x", country="FR", lat=48.8, lon=2.3)
        async with loopback.behind_a_redirect(b"model bytes on a mirror") as (url, asked):
            bundle = FLEET.replace("https://evil.example.net/m.onnx", url)
            async with httpx.AsyncClient(base_url=cp.http_url) as http:
                assert (await http.post("/v1/apply", content=bundle)).status_code == 200
            refusal = "whose host 'localhost' is not an allowed artifact host (127.0.0.1"

            def reported() -> bool:
                agent = cp.hub.status("edge-x")
                return agent is not None and any(refusal in m.message for m in agent.models.values())

            await harness.wait_until(reported, 30, what="the agent's refusal of the redirect")
            assigned = cp.hub.assignments("edge-x")
            assert assigned is not None and [a.artifact_hosts for a in assigned.assignments] == [("127.0.0.1",)]
            assert asked == []
    finally:
        await fleet.stop()
