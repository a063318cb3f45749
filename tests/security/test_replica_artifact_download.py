"""A data-centre replica's download enters the node's artifact cache only with the digest the
Model names and within the size a replica downloads: a refused one leaves nothing behind, a
good one is downloaded once per node."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import edge_agent
from orchestrator.serving import artifacts
from orchestrator.testing import loopback

BODY = b"x" * 100_000


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("EDGEPLANE_ARTIFACT_CACHE", str(tmp_path))
    return artifacts.cache_dir()


async def fetch(uri: str, sha256: str, redirect_hosts: tuple[str, ...] = ()) -> pathlib.Path:
    return await asyncio.to_thread(artifacts.fetch_verified, uri, sha256, timeout_s=30, redirect_hosts=redirect_hosts)


@pytest.mark.asyncio
async def test_a_download_with_another_digest_is_refused_and_leaves_nothing_in_the_cache(cache: pathlib.Path) -> None:
    app = Starlette(routes=[Route("/m.onnx", lambda _: Response(BODY))])
    async with loopback.serving(app) as port:
        with pytest.raises(artifacts.ArtifactError, match="refusing to load it"):
            await fetch(f"http://127.0.0.1:{port}/m.onnx", hashlib.sha256(b"the real model").hexdigest())
    assert sorted(p.name for p in cache.iterdir()) == []


@pytest.mark.asyncio
async def test_a_download_with_its_digest_is_cached_and_downloaded_once(cache: pathlib.Path) -> None:
    requests: list[str] = []

    async def model(request: Request) -> Response:
        requests.append(request.url.path)
        return Response(BODY)

    sha = hashlib.sha256(BODY).hexdigest()
    async with loopback.serving(Starlette(routes=[Route("/m.onnx", model)])) as port:
        first = await fetch(f"http://127.0.0.1:{port}/m.onnx", sha)
        again = await fetch(f"http://127.0.0.1:{port}/m.onnx", sha)
    assert first == again == cache / f"{sha}.onnx" and first.read_bytes() == BODY
    assert requests == ["/m.onnx"]
    assert sorted(p.name for p in cache.iterdir()) == [f"{sha}.onnx"]


@pytest.mark.asyncio
@pytest.mark.parametrize("announced", [True, False], ids=["length-announced", "length-not-announced"])
async def test_a_download_larger_than_the_limit_is_refused_and_leaves_nothing(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                                              announced: bool) -> None:
    monkeypatch.setenv("EDGEPLANE_MAX_ARTIFACT_GB", str(50_000 / (1 << 30)))  # 50 kB: BODY is 100 kB

    async def body() -> AsyncIterator[bytes]:
        yield BODY

    app = Starlette(routes=[Route("/m.onnx", lambda _: Response(BODY) if announced else StreamingResponse(body()))])
    async with loopback.serving(app) as port:
        with pytest.raises(artifacts.ArtifactError, match="larger than a replica downloads"):
            await fetch(f"http://127.0.0.1:{port}/m.onnx", hashlib.sha256(BODY).hexdigest())
    assert sorted(p.name for p in cache.iterdir()) == []


@pytest.mark.asyncio
async def test_a_redirect_to_a_host_not_allowed_is_refused_naming_it(cache: pathlib.Path) -> None:
    async with loopback.behind_a_redirect(BODY) as (url, asked):
        with pytest.raises(artifacts.ArtifactError, match=r"redirects to http://localhost:\d+/m.onnx, whose host 'localhost' "
                                                          r"is not an allowed artifact host \(models.example.com"):
            await fetch(url, hashlib.sha256(BODY).hexdigest(), ("models.example.com",))
        assert asked == []  # never reached
    assert sorted(p.name for p in cache.iterdir()) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("redirect_hosts", [("localhost",), ()], ids=["allowed", "any-host"])
async def test_a_redirect_to_an_allowed_host_is_followed(cache: pathlib.Path, redirect_hosts: tuple[str, ...]) -> None:
    sha = hashlib.sha256(BODY).hexdigest()
    async with loopback.behind_a_redirect(BODY) as (url, asked):
        assert (await fetch(url, sha, redirect_hosts)).read_bytes() == BODY
    assert asked == ["/m.onnx"]


@pytest.mark.asyncio
async def test_redirects_are_followed_a_bounded_number_of_times(cache: pathlib.Path) -> None:
    hops: list[str] = []

    async def again(request: Request) -> Response:
        hops.append(request.url.path)
        return Response(status_code=302, headers={"location": "/m.onnx"})

    async with loopback.serving(Starlette(routes=[Route("/m.onnx", again)])) as port:
        with pytest.raises(artifacts.ArtifactError, match=f"more than {artifacts.MAX_REDIRECTS} redirects"):
            await fetch(f"http://127.0.0.1:{port}/m.onnx", hashlib.sha256(BODY).hexdigest())
    assert len(hops) == artifacts.MAX_REDIRECTS + 1
    assert sorted(p.name for p in cache.iterdir()) == []


@pytest.mark.parametrize("setting", ["0", "-1", "nan", "inf", "1e400", "64 GiB"])
def test_a_download_limit_that_is_not_a_finite_size_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv("EDGEPLANE_MAX_ARTIFACT_GB", setting)
    with pytest.raises(artifacts.ArtifactError, match=r"^EDGEPLANE_MAX_ARTIFACT_GB=.*: must be a finite number of GiB above 0$"):
        artifacts.max_bytes()


def test_the_download_limit_defaults_to_an_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEPLANE_MAX_ARTIFACT_GB", raising=False)
    assert artifacts.max_bytes() == edge_agent.DEFAULT_MAX_ARTIFACT_GIB << 30
