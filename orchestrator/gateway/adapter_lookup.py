"""Whether a LoRA adapter is in its model's bucket, asked of one replica that serves adapters.

The gateway does not read the buckets (:mod:`orchestrator.gateway.adapter_names`): a
``models.retrieve('<model>:<adapter>')`` asks a replica the caller may reach for the
adapter's model card, which Ray Serve LLM makes by reading the adapter's
``adapter_config.json`` and refuses with a 404 when it finds none. A replica that cannot
say (down, slow, another answer) leaves the adapter taken as one a replica may load.
"""

from __future__ import annotations

import urllib.parse

from orchestrator.gateway import adapter_names, routing, upstream


async def found(http: upstream.UpstreamPool, e: routing.Endpoint, model: str, named: adapter_names.Named) -> bool:
    """Whether the replica ``e`` of ``model`` finds ``named``'s adapter (True when it cannot say)."""
    asked = named.asked(e.served_model or model)
    try:
        answer = await http.request("GET", f"{e.url}/v1/models/{urllib.parse.quote(asked, safe='/:')}")
    except (upstream.UpstreamError, upstream.OutOfDescriptors):
        return True
    return not adapter_names.unknown(answer.status, answer.body, asked)
