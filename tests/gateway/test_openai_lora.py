"""LoRA adapters at the gateway, through the official ``openai`` SDK: ``<model>:<adapter>``
goes to the model's replicas that serve adapters (a vllm variant with ``llm.lora``), named
as Ray Serve LLM expects (``<served model>:<adapter>``), by the same residency and
nearness rules as the base model; a model without adapters, or a malformed name, is
refused saying why, before any replica is asked.

The replicas are stand-ins on loopback that answer as Ray Serve LLM's OpenAI ingress does:
its base model id, or that id and an adapter folder after a ``:``; 404 otherwise.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent import httpmessages
from orchestrator.gateway import endpoints, openai_relay, routing
from orchestrator.testing.loopback import replica, serving
from tests.gateway.openai_cascades import chat_reply, gateway_app

USER = [{"role": "user", "content": "hi"}]
BERLIN = {"X-Edgeplane-Location": "52.52,13.40"}


def ray_llm(site: str, served: str, asked: list[tuple[str, str]]) -> httpmessages.Handler:
    """A Ray Serve LLM application serving ``served`` (and its adapters: any ``served:<folder>``)."""
    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        model = json.loads(request.body)["model"]
        asked.append((site, model))
        if model.split(":")[0] != served:
            return httpmessages.Response(404, openai_relay.error_body(f'Could not find base model with ID "{model}".', 404))
        return chat_reply(request, f"{model} at {site}")
    return handle


@asynccontextmanager
async def fleet(asked: list[tuple[str, str]], registry: CollectorRegistry | None = None) -> AsyncIterator[openai.AsyncOpenAI]:
    """``support`` on a LoRA replica in Paris (FR residency) and a plain one in Frankfurt;
    ``plain`` on a replica without adapters; the gateway's metrics in ``registry``."""
    async with replica(ray_llm("dc-paris", "org/support", asked)) as paris, \
            replica(ray_llm("dc-frankfurt", "org/support", asked)) as frankfurt, \
            replica(ray_llm("dc-plain", "plain", asked)) as plain:
        table = endpoints.EndpointTable()
        table.replace([
            routing.Endpoint("support", "support-fr", "dc-paris", "datacenter", "FR", "fr", 48.85, 2.35, paris, api=routing.API_OPENAI,
                             served_model="org/support", lora=True, allowed_countries=frozenset({"FR"})),
            routing.Endpoint("support", "support-de", "dc-frankfurt", "datacenter", "DE", "de", 50.11, 8.68, frankfurt,
                             api=routing.API_OPENAI, served_model="org/support"),
            routing.Endpoint("plain", "plain", "dc-plain", "datacenter", "DE", "de", 50.11, 8.68, plain, api=routing.API_OPENAI),
        ])
        async with gateway_app(table, registry=registry) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            try:
                yield sdk
            finally:
                await sdk.close()


async def test_an_adapter_goes_to_a_replica_serving_adapters_named_as_ray_expects() -> None:
    asked: list[tuple[str, str]] = []
    async with fleet(asked) as sdk:
        # from Berlin the base model's nearest replica is Frankfurt's, which has no adapters
        base = await sdk.chat.completions.with_raw_response.create(model="support", messages=USER, extra_headers=BERLIN)
        adapted = await sdk.chat.completions.with_raw_response.create(model="support:tenant-a", messages=USER, extra_headers=BERLIN)
        streamed = await sdk.chat.completions.create(model="support:tenant-b", messages=USER, stream=True, extra_headers=BERLIN)
        tokens = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
        completion = await sdk.completions.create(model="support:v2:tenant-c", prompt="hi", extra_headers=BERLIN)
    assert base.headers["x-edgeplane-site"] == "dc-frankfurt" and base.parse().choices[0].message.content == "org/support at dc-frankfurt"
    assert adapted.headers["x-edgeplane-site"] == "dc-paris"
    assert adapted.parse().choices[0].message.content == "org/support:tenant-a at dc-paris"
    assert tokens == "org/support:tenant-b at dc-paris"
    assert completion.model  # an answer came back: what the replica was asked for says the rest
    assert asked == [("dc-frankfurt", "org/support"), ("dc-paris", "org/support:tenant-a"), ("dc-paris", "org/support:tenant-b"),
                     ("dc-paris", "org/support:v2:tenant-c")]


async def test_an_adapter_of_a_model_without_adapters_is_refused_naming_why() -> None:
    asked: list[tuple[str, str]] = []
    async with fleet(asked) as sdk:
        with pytest.raises(openai.NotFoundError) as refused:
            await sdk.chat.completions.create(model="plain:tenant-a", messages=USER)
        with pytest.raises(openai.NotFoundError) as unknown:
            await sdk.chat.completions.create(model="nothing:tenant-a", messages=USER)
    assert "model 'plain' serves no LoRA adapters" in refused.value.message and "llm.lora" in refused.value.message
    assert refused.value.body["code"] == "model_not_found" and refused.value.body["param"] == "model"  # type: ignore[index]
    assert "model 'nothing' is not deployed" in unknown.value.message
    assert asked == []


@pytest.mark.parametrize(("model", "why"), [
    ("support:", "names no adapter after ':'"),
    (":tenant-a", "names no model before ':'"),
    ("support:../other", "no adapter's name"),
    ("support:tenant/a", "no adapter's name"),
    ("support:.hidden", "no adapter's name"),
])
async def test_a_malformed_adapter_name_is_refused_before_any_replica_sees_it(model: str, why: str) -> None:
    asked: list[tuple[str, str]] = []
    async with fleet(asked) as sdk:
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(model=model, messages=USER)
    assert why in refused.value.message and refused.value.body["param"] == "model"  # type: ignore[index]
    assert asked == []


async def test_an_adapter_keeps_the_residency_of_its_replicas() -> None:
    """The LoRA replica serves FR callers only: a caller bound to DE gets no adapter, though
    the base model has a replica for it."""
    asked: list[tuple[str, str]] = []
    async with fleet(asked) as sdk:
        german = {"X-Edgeplane-Residency": "DE"}
        base = await sdk.chat.completions.with_raw_response.create(model="support", messages=USER, extra_headers=german)
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk.chat.completions.create(model="support:tenant-a", messages=USER, extra_headers=german)
    assert base.headers["x-edgeplane-site"] == "dc-frankfurt"
    assert refused.value.status_code == 503 and "DE" in refused.value.message
    assert asked == [("dc-frankfurt", "org/support")]


async def test_the_model_list_shows_base_models_and_an_adapter_can_be_retrieved() -> None:
    """edgeplane does not list the adapters' folders: ``models.list`` shows the base models,
    and ``models.retrieve`` of ``<model>:<adapter>`` says a replica may load it where the
    replica asked cannot say (these stand-ins answer no GET)."""
    asked: list[tuple[str, str]] = []
    async with fleet(asked) as sdk:
        listed = [m.id for m in (await sdk.models.list()).data]
        retrieved = await sdk.models.retrieve("support:tenant-a")
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("plain:tenant-a")
        with pytest.raises(openai.BadRequestError):
            await sdk.models.retrieve("support:")
    assert listed == ["plain", "support"]
    assert retrieved.id == "support:tenant-a"
    assert asked == []


async def test_adapter_requests_are_counted_apart_under_their_base_model() -> None:
    """Requests for an adapter were counted in edgeplane_gateway_requests_total under the base
    model alone, like the base model's own: /metrics now counts them apart, by base model
    (adapters are not a label: any caller can name a new one)."""
    asked: list[tuple[str, str]] = []
    registry = CollectorRegistry()
    async with fleet(asked, registry) as sdk:
        await sdk.chat.completions.create(model="support", messages=USER, extra_headers=BERLIN)
        await sdk.chat.completions.create(model="support:tenant-a", messages=USER, extra_headers=BERLIN)
        await sdk.completions.create(model="support:tenant-b", prompt="hi", extra_headers=BERLIN)
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(model="support:../other", messages=USER)
    scraped = generate_latest(registry).decode()
    assert 'edgeplane_gateway_adapter_requests_total{model="support"} 2.0' in scraped
    assert 'edgeplane_gateway_requests_total{code="200",model="support",site="dc-paris"} 2.0' in scraped
    assert 'edgeplane_gateway_requests_total{code="200",model="support",site="dc-frankfurt"} 1.0' in scraped
    assert "tenant" not in scraped


def ray_missing_adapter(folder: str) -> bytes:
    """Ray Serve LLM's answer (``get_response_for_error`` of the ``HTTPException`` its LoRA
    loader raises) to a request for an adapter whose folder holds no adapter_config.json."""
    detail = (f'Unable to find LoRA adapter config file "adapter_config.json" in folder s3://acme-adapters/support/{folder}. '
              "Check that the file exists and that you have read permissions.")
    message = f"Message: {detail} (Request ID: 7f3a), Internal exception: 404: {detail} (Request ID: 7f3a), original exception: 404: {detail}"
    return json.dumps({"error": {"message": message, "type": "RayTaskError(HTTPException)", "param": None, "code": 404}}).encode()


def ray_llm_with(site: str, served: str, adapters: set[str], asked: list[tuple[str, str]]) -> httpmessages.Handler:
    """:func:`ray_llm` whose bucket holds ``adapters`` only: any other is Ray's 404."""
    plain = ray_llm(site, served, asked)

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        if request.method == "GET":  # Ray's models.retrieve: the adapter's card, or its OpenAIHTTPException
            asked.append((site, request.path))
            model = request.path.removeprefix("/v1/models/")
            if model.partition(":")[2] in adapters:
                return httpmessages.Response(200, json.dumps({"id": model, "object": "model", "owned_by": "org"}).encode())
            missing = f"Unable to find {model}. Please ensure that the model exists and you have permission."
            return httpmessages.Response(404, json.dumps({"error": {
                "message": f"Message: {missing} (Request ID: 7f3b), Internal exception: {missing}, original exception: {missing}",
                "type": "OpenAIHTTPException", "param": None, "code": 404}}).encode())
        _, sep, adapter = json.loads(request.body)["model"].partition(":")
        if sep and adapter not in adapters:
            asked.append((site, json.loads(request.body)["model"]))
            return httpmessages.Response(404, ray_missing_adapter(adapter))
        return await plain(request)
    return handle


async def test_a_missing_adapter_is_a_404_naming_it_from_the_first_replica() -> None:
    """An adapter not in the bucket was a 502 'every replica tried failed' after each replica
    with adapters had been asked for it and had read the bucket (Ray's 404 read as a replica
    the model moved away from); it is now a 404 naming the adapter, from the first replica,
    with no failover and no bucket path told to the caller."""
    asked: list[tuple[str, str]] = []  # from Berlin, Paris is nearer than Lyon
    registry = CollectorRegistry()
    async with replica(ray_llm_with("dc-paris", "org/support", {"tenant-a"}, asked)) as paris, \
            replica(ray_llm_with("dc-lyon", "org/support", {"tenant-a"}, asked)) as lyon:
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("support", "support", site, "datacenter", "FR", "fr", lat, lon, url, api=routing.API_OPENAI,
                                        served_model="org/support", lora=True)
                       for site, lat, lon, url in (("dc-paris", 48.85, 2.35, paris), ("dc-lyon", 45.76, 4.84, lyon))])
        async with gateway_app(table, registry=registry) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            with pytest.raises(openai.NotFoundError) as whole:
                await sdk.chat.completions.create(model="support:tenant-x", messages=USER, extra_headers=BERLIN)
            with pytest.raises(openai.NotFoundError) as streamed:
                await sdk.chat.completions.create(model="support:tenant-y", messages=USER, stream=True, extra_headers=BERLIN)
            found = await sdk.chat.completions.create(model="support:tenant-a", messages=USER, extra_headers=BERLIN)
            await sdk.close()
    for refused, adapter in ((whole, "tenant-x"), (streamed, "tenant-y")):
        assert f"adapter '{adapter}' of model 'support' was not found" in refused.value.message
        assert refused.value.body["code"] == "model_not_found" and refused.value.body["param"] == "model"  # type: ignore[index]
        assert "s3://" not in refused.value.message and "acme" not in refused.value.message
    assert found.choices[0].message.content.endswith("org/support:tenant-a at dc-paris")  # type: ignore[union-attr]
    assert asked == [("dc-paris", "org/support:tenant-x"), ("dc-paris", "org/support:tenant-y"), ("dc-paris", "org/support:tenant-a")]
    scraped = generate_latest(registry).decode()
    assert "edgeplane_gateway_failovers_total{" not in scraped
    assert 'edgeplane_gateway_requests_total{code="404",model="support",site="dc-paris"} 2.0' in scraped


async def test_retrieving_a_missing_adapter_is_a_404_naming_it() -> None:
    """models.retrieve('support:tenant-x') answered 200 for any adapter name, there or not, so
    a caller could not check its adapter before asking for it: it now asks one replica with
    adapters (Ray reads the adapter's folder) and answers 404 naming the adapter when it is not there."""
    asked: list[tuple[str, str]] = []
    async with replica(ray_llm_with("dc-paris", "org/support", {"tenant-a"}, asked)) as paris:
        table = endpoints.EndpointTable()
        table.replace([routing.Endpoint("support", "support", "dc-paris", "datacenter", "FR", "fr", 48.85, 2.35, paris,
                                        api=routing.API_OPENAI, served_model="org/support", lora=True)])
        async with gateway_app(table) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            there = await sdk.models.retrieve("support:tenant-a")
            base = await sdk.models.retrieve("support")
            with pytest.raises(openai.NotFoundError) as missing:
                await sdk.models.retrieve("support:tenant-x")
            await sdk.close()
    assert there.id == "support:tenant-a" and base.id == "support"
    assert "adapter 'tenant-x' of model 'support' was not found" in missing.value.message
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"  # type: ignore[index]
    assert asked == [("dc-paris", "/v1/models/org/support:tenant-a"), ("dc-paris", "/v1/models/org/support:tenant-x")]
