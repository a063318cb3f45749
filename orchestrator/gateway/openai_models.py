"""The model list and model cards of the OpenAI routes (``GET /models``, ``GET /models/{id}``).

The SDK's ``models.list()`` and ``models.retrieve()`` ask the gateway which models it can
generate with, which is a question of routing, not of relaying: a model is listed when the
caller may reach one of its replicas that speaks OpenAI, and its card is answered by the
site that a chat by that name would go to (``X-Edgeplane-Site``). A LoRA adapter's card
(``<model>:<adapter>``, :mod:`orchestrator.gateway.adapter_names`) is asked of that first
replica (:mod:`orchestrator.gateway.adapter_lookup`), since only a replica reads the
adapters' bucket. The routes themselves, with admission and OpenAI's error objects, are
:mod:`orchestrator.gateway.openai_routes`'.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from orchestrator.gateway import adapter_lookup, adapter_names, openai_routes, routing


class ModelCards:
    """The two model routes of one :class:`~orchestrator.gateway.openai_routes.OpenAIGateway`."""

    def __init__(self, owner: openai_routes.OpenAIGateway) -> None:
        self.owner = owner

    async def list_models(self, request: Request) -> Response:
        owner = self.owner
        refused = await owner.admit(request, inference=False)
        if refused is not None:
            return refused
        caller = owner.gw.caller(request)
        if isinstance(caller, routing.NoRoute):
            return openai_routes.caller_error(caller)
        data = []
        for name in sorted({*owner.gw.table.models(), *owner.gw.table.cascades}):  # a cascade by its deployment's name too
            if owner.gw.out_of_scope(request, name) is not None:  # a scoped token sees its own models alone
                continue
            model, deployment = owner.gw.table.target(name)
            ranked = owner.rank(model, request, caller, limit=1, deployment=deployment)
            if isinstance(ranked, list) and any(r.endpoint.api == routing.API_OPENAI for r in ranked):
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "edgeplane"})
        return Response(json.dumps({"object": "list", "data": data}), media_type="application/json")

    async def get_model(self, request: Request) -> Response:
        owner = self.owner
        name = request.path_params["model"]
        named = adapter_names.parse(name)
        refused = await owner.admit(request, named.name if isinstance(named, adapter_names.Named) else None, inference=False)
        if refused is not None:
            return refused
        if isinstance(named, str):
            return openai_routes.error(400, named, param="model", code="invalid_model")
        if (why := owner.gw.out_of_scope(request, named.name)) is not None:
            return openai_routes.scope_error(why)
        # as a chat by that name is routed; an adapter is looked for at the first replica (adapter_lookup)
        model, deployment = owner.gw.table.target(named.name)
        ranked = owner.openai_candidates(model, request, limit=1, deployment=deployment, lora=named.adapter is not None)
        if isinstance(ranked, Response):
            return ranked
        if named.adapter is not None and not await adapter_lookup.found(owner.gw.http, ranked[0].endpoint, model, named):
            return openai_routes.error(404, adapter_names.not_found(named), param="model", code="model_not_found")
        return Response(json.dumps({"id": name, "object": "model", "created": 0, "owned_by": "edgeplane"}),
                        media_type="application/json", headers={"x-edgeplane-site": ranked[0].endpoint.site})
