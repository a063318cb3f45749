import asyncio, time
from .test_genai_openai import *  # noqa

async def test_probe(control_plane, make_agent, packages):
    async for s in serve(control_plane, make_agent, packages.slow_url, packages.slow.sha256, concurrent=1, queued=1):
        body = {"model": MODEL, "prompt": "The agent", "max_tokens": 4000, "temperature": 0, "stream": True}
        t0 = time.perf_counter()
        async with s.http.stream("POST", "/v1/completions", json=body) as running:
            first = running.aiter_lines()
            assert (await anext(first)).startswith("data: ")
            for i in range(20):
                await asyncio.sleep(0.5)
                seqs = list(s.agent._generation._state.values()) if hasattr(s.agent, "_generation") else None
                print(i, await s.metric("edgeplane_agent_generation_running", model=MODEL), time.perf_counter()-t0, flush=True)
        n=0
        async with s.http.stream("POST", "/v1/completions", json=body) as r2:
            t1=time.perf_counter()
            async for line in r2.aiter_lines():
                n+=1
        print("full 4000 in", time.perf_counter()-t1, n)
