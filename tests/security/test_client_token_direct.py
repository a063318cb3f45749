"""The Python client sends its token to an agent it calls directly only where the endpoint
list says that agent checks tokens (``auth: "token"``, an agent run with ``--serve-auth
token``): an agent run with ``--serve-auth none`` never receives it, nor does one whose entry
does not say (a control plane of an earlier release). Real control plane, real agent
subprocesses, loopback; each agent is reached through a recorder on its advertised URL that
keeps the headers of every request before handing it on."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio

from orchestrator import client as client_mod
from orchestrator import ports
from orchestrator.testing import harness, manifests, onnx_models
from orchestrator.testing.postgres import PostgresServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

SITES = {"edge-paris": ("token", 48.85, 2.35), "edge-lyon": ("none", 45.76, 4.84)}
INPUT = {"input": np.full((1, 8), 0.1, dtype=np.float32)}


class Recorder:
    """Hands every request on to the agent at ``port``, one connection each, and keeps its headers."""

    def __init__(self, port: int) -> None:
        self.port, self.heads = port, []  # type: ignore[var-annotated]
        self.url = ""
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")[1:-2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            self.heads.append(headers)
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            kept = [line for line in lines if not line.lower().startswith("connection:")]
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            sent = "\r\n".join([request_line, *kept, "connection: close", "", ""]).encode("latin-1") + body
            agent_reader, agent_writer = await asyncio.open_connection("127.0.0.1", self.port)
            agent_writer.write(sent)
            await agent_writer.drain()
            writer.write(await agent_reader.read())  # the whole answer: the agent closes after it
            agent_writer.close()
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    root = pathlib.Path(tmp_path_factory.mktemp("client-token"))
    built = onnx_models.build_mlp(root / "artifacts" / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    f = harness.Fleet(root)
    recorders: dict[str, Recorder] = {}
    try:
        cp = await f.start_control_plane(gateway_auth="token")
        admin = (root / "control-plane" / "admin.token").read_text().strip()
        bundle = manifests.bundle(
            *(manifests.edge_site(site, country="FR", region="fr", lat=lat, lon=lon) for site, (_, lat, lon) in SITES.items()),
            manifests.onnx_model("intent", "intent.onnx", built.sha256),
            manifests.deployment("intent-fr", "intent", 2, manifests.spread_by_site(tiers=["edge"])),
        )
        async with httpx.AsyncClient(base_url=cp.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
            assert (await http.post("/v1/apply", content=bundle)).status_code == 200
            made = await http.post("/v1/tokens", json={"purpose": "api", "role": "read", "models": ["intent"]})
            assert made.status_code == 201, made.text
        for site, (auth, lat, lon) in SITES.items():
            port = ports.free_port()
            recorders[site] = recorder = Recorder(port)
            await recorder.start()
            await f.start_agent(site, country="FR", region="fr", lat=lat, lon=lon,
                                extra=("--serve-auth", auth, "--listen", f"127.0.0.1:{port}", "--advertise-url", recorder.url))
        await harness.wait_until(lambda: sum(e.healthy for e in cp.table.endpoints("intent")) == 2, 60, what="intent served twice")
        yield {"cp": cp, "admin": admin, "scoped": str(made.json()["token"]), "recorders": recorders}
    finally:
        for recorder in recorders.values():
            await recorder.close()
        await f.stop()


def _authorized(recorder: Recorder) -> list[bool]:
    """For each model call the recorder saw, whether it carried a token."""
    return [("authorization" in head) for head in recorder.heads]


async def test_the_endpoint_list_says_which_agents_check_tokens(fleet: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=fleet["cp"].http_url, headers={"authorization": f"Bearer {fleet['admin']}"}) as http:
        one = (await http.get("/v1/endpoints/intent")).json()["endpoints"]
        table = (await http.get("/v1/endpoints")).json()
    assert {e["site"]: e["auth"] for e in one} == {"edge-paris": "token", "edge-lyon": "none"}
    assert {e["site"]: e["auth"] for e in table["table"]["endpoints"] if e["model"] == "intent"} == {"edge-paris": "token", "edge-lyon": "none"}


@pytest.mark.parametrize("who", ["scoped", "admin"])
async def test_the_token_goes_to_the_agent_that_checks_it_and_never_to_one_that_does_not(fleet: dict[str, Any], who: str) -> None:
    recorders: dict[str, Recorder] = fleet["recorders"]
    for recorder in recorders.values():
        recorder.heads.clear()
    results = {}
    for site, (_, lat, lon) in SITES.items():
        async with client_mod.AsyncClient(fleet["cp"].http_url, token=fleet[who], location=(lat, lon)) as app:
            results[site] = await app.infer("intent", INPUT)
    assert {site: r.url for site, r in results.items()} == {site: r.url for site, r in recorders.items()}  # directly, each
    assert _authorized(recorders["edge-paris"]) == [True]
    assert _authorized(recorders["edge-lyon"]) == [False]  # the model's inference, without the token


async def test_an_entry_that_does_not_say_gets_no_token_and_a_refusal_moves_on_to_the_gateway(fleet: dict[str, Any]) -> None:
    paris = fleet["recorders"]["edge-paris"]
    paris.heads.clear()
    _, lat, lon = SITES["edge-lyon"]  # the gateway routes to the agent nearest the caller
    async with client_mod.AsyncClient(fleet["cp"].http_url, token=fleet["scoped"], location=(lat, lon)) as app:
        app.cache.store(app.listing_key("intent"), {"ttlSeconds": 600, "endpoints": [  # as an earlier control plane lists it: no "auth"
            {"site": "edge-paris", "url": paris.url, "inferUrl": f"{paris.url}/v2/models/intent/infer"}]})
        result = await app.infer("intent", INPUT)
    assert _authorized(paris) == [False]  # refused 401 without the token; then asked through the gateway
    assert (result.url, result.site) == (fleet["cp"].http_url, "edge-lyon")


async def test_the_leader_hears_it_of_an_agent_another_replica_relays(tmp_path: pathlib.Path, postgres: PostgresServer) -> None:
    art = tmp_path / "art"
    built = onnx_models.build_mlp(art / "intent.onnx", in_dim=8, hidden=16, out_dim=4, seed=3)
    bundle = manifests.bundle(manifests.edge_site("edge-paris", country="FR", region="fr", lat=48.85, lon=2.35),
                              manifests.onnx_model("intent", "intent.onnx", built.sha256),
                              manifests.deployment("intent-fr", "intent", 1, {"tiers": ["edge"]}))
    async with harness.leader_and_follower(tmp_path, postgres.create_database(), both={"artifact_roots": (art,)}) as (fa, fb):
        assert fa.cp is not None
        async with httpx.AsyncClient(base_url=fa.cp.http_url, timeout=30) as http:
            assert (await http.post("/v1/apply", content=bundle)).status_code == 200
        await fb.start_agent("edge-paris", country="FR", region="fr", lat=48.85, lon=2.35, extra=("--serve-auth", "token"))
        (served,) = await harness.wait_until(lambda: [e for e in fa.cp.table.endpoints("intent") if e.healthy], 60,  # type: ignore[union-attr]
                                             what="intent served, seen by the leader")
        status = fa.cp.hub.status("edge-paris")
    assert status is not None and status.via is not None and status.checks_tokens  # relayed, and said
    assert served.auth == "token"
