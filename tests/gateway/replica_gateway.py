"""A gateway over loopback replicas, for the tests that start each replica themselves: its
models m (v2) and llm (OpenAI) have one replica on each port given, at site-i, each further
east of the caller than the one before."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.types import ASGIApp

from orchestrator.gateway import endpoints, openai_routes, proxy, routing
from orchestrator.gateway.upstream import UpstreamPool
from orchestrator.testing import loopback


@contextlib.asynccontextmanager
async def gateway_at(ports: list[int], table: endpoints.EndpointTable | None = None,
                     wrap: Callable[[ASGIApp], ASGIApp] = lambda app: app) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway whose models have a replica on each of ``ports`` (written into
    ``table`` when one is given); ``wrap`` puts middleware (an access log) around its app."""
    async with contextlib.AsyncExitStack() as stack:
        table = table or endpoints.EndpointTable()
        table.replace([routing.Endpoint(model, model, f"site-{i}", "edge", "FR", "west", 48.85, 2.35 + i, f"http://127.0.0.1:{port}",
                                        api=api)
                       for i, port in enumerate(ports) for model, api in (("m", "v2"), ("llm", "openai"))])
        registry = CollectorRegistry()
        gateway = proxy.Gateway(table, UpstreamPool(), proxy.GatewayMetrics.create(registry))
        app = Starlette(routes=gateway.routes() + openai_routes.OpenAIGateway(gateway, registry=registry).routes())
        port = await stack.enter_async_context(loopback.serving(wrap(app)))
        yield await stack.enter_async_context(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10))
