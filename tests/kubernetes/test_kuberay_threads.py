"""A KubeRay site's calls to a Kubernetes API server that never answers hold none of asyncio's
default threads, which planning, agents' checks and the server's stop run on, and closing
the site's actuator does not wait for them. The API server is a stand-in on loopback that
takes each request and never answers it, until the test lets it go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import kubernetes
import pytest
from rayservice_apps import NS, SHAPE

from orchestrator.adapters import kuberay


@pytest.fixture
async def silent_api() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """The URL of an API server that takes requests and never answers; an event set once one came."""
    came, gone = asyncio.Event(), asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        came.set()
        await gone.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", came
    finally:
        gone.set()  # the calls still waiting end (their connection closed), and their threads with them
        server.close()
        await server.wait_closed()


async def test_a_call_past_its_bound_holds_no_default_thread_and_the_actuator_still_closes(
        silent_api: tuple[str, asyncio.Event]) -> None:
    url, came = silent_api
    # the default pool with one thread: taken by a call, everything else run on it would wait
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="default"))
    config = kubernetes.client.Configuration()
    config.host, config.retries = url, 0
    actuator = kuberay.KubeRayActuator(kubernetes.client.ApiClient(config), NS, "paris-dc", shape=SHAPE,
                                       request_timeout_s=3600, call_wait_s=0.2)
    with pytest.raises(kuberay.KubernetesUnreachable, match="has not ended in 0.2 s"):
        await actuator.observe()
    assert came.is_set()
    async with asyncio.timeout(10):  # a hang guard: each of these ends at once
        assert await asyncio.to_thread(lambda: "ran") == "ran", "work on the default pool waited for the call"
        await actuator.close()
