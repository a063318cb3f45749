"""A LoRA adapter that is in the bucket but that no replica can load, through the ``openai``
SDK: Ray Serve LLM's 500 for it is the caller's answer from the first replica, 422
``adapter_not_loadable`` saying why, and not a replica fault to fail over from.

The replicas are stand-ins on loopback that answer as Ray Serve LLM's OpenAI ingress does
(``get_response_for_error`` of the ``RayTaskError`` its ``LLMServer`` raised): the
exception is a real one, a real ``RayTaskError`` formats it, and a download that does not
finish is Ray's own ``LoraModelLoader`` waiting on a download that holds its lock.
"""

from __future__ import annotations

import json
import pathlib
import traceback

import filelock
import openai
import pytest
import ray.exceptions
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent import httpmessages
from orchestrator.gateway import adapter_refusals, endpoints, routing
from orchestrator.testing.loopback import replica, serving
from tests.gateway.openai_cascades import gateway_app
from tests.gateway.test_openai_lora import BERLIN, USER, ray_llm

lora_serve_utils = pytest.importorskip("ray.llm._internal.serve.utils.lora_serve_utils",
                                       reason="Ray Serve LLM's LoRA loader needs pyarrow (pip install -e '.[dev]')")
cloud_utils = pytest.importorskip("ray.llm._internal.common.utils.cloud_utils")

RANK = "LoRA rank 64 is greater than max_lora_rank 16."
#: vLLM's refusal of weights made for another base model names the adapter's local copy.
OTHER_BASE = ("While loading /tmp/ray/llm/lora/cache/tenant-other, expected target modules in ['q_proj', 'v_proj'] "
              "but received ['query_key_value']. Please verify that the loaded LoRA module is correct")


def resolve_lora(vllm_error: str) -> None:
    """As Ray Serve LLM's ``VLLMEngine.resolve_lora`` does with vLLM's ``ErrorResponse``."""
    raise ValueError(f"Failed to load lora model: {vllm_error}")


def ray_500(call: object) -> bytes:
    """Ray Serve LLM's 500 for what ``call()`` raised in its ``LLMServer`` (``get_response_for_error``
    of the ``RayTaskError`` the ingress gets: 'Internal Server Error', then the replica's traceback)."""
    try:
        call()  # type: ignore[operator]
    except Exception as exc:
        raised = ray.exceptions.RayTaskError("LLMServer.chat", traceback.format_exc(), exc).as_instanceof_cause()
    inner = "Internal Server Error (Request ID: 7f3c)"
    return json.dumps({"error": {"message": f"Message: {inner}, Internal exception: {inner}, original exception: {raised}",
                                 "type": "InternalServerError", "param": None, "code": 500}}).encode()


def download_not_finished(root: pathlib.Path) -> None:
    """Ray's LoRA loader waiting (``download_timeout_s`` x ``max_tries``) on a download of the
    adapter that holds its lock and does not finish."""
    loader = lora_serve_utils.LoraModelLoader(lora_root=str(root), download_timeout_s=0.05, max_tries=1)
    mirror = cloud_utils.LoraMirrorConfig(lora_model_id="org/support:tenant-slow", bucket_uri="s3://acme-adapters/support/tenant-slow",
                                          max_total_tokens=None)
    with filelock.FileLock(loader._model_dir_path(mirror.lora_model_id) + ".lock"):
        loader._load_model_sync(mirror)


def engine_fault() -> None:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def support_at(paris: str, lyon: str) -> list[routing.Endpoint]:
    """``support`` (Ray Serve LLM's ``org/support``, with adapters) at Paris and Lyon."""
    return [routing.Endpoint("support", "support", site, "datacenter", "FR", "fr", lat, lon, url, api=routing.API_OPENAI,
                             served_model="org/support", lora=True)
            for site, lat, lon, url in (("dc-paris", 48.85, 2.35, paris), ("dc-lyon", 45.76, 4.84, lyon))]


def ray_llm_failing(site: str, failing: dict[str, bytes], asked: list[tuple[str, str]]) -> httpmessages.Handler:
    """A Ray Serve LLM replica of ``org/support`` answering Ray's 500 ``failing[adapter]`` for those adapters."""
    plain = ray_llm(site, "org/support", asked)

    async def handle(request: httpmessages.Request) -> httpmessages.Response:
        model = json.loads(request.body)["model"]
        if (answer := failing.get(model.partition(":")[2])) is not None:
            asked.append((site, model))
            return httpmessages.Response(500, answer)
        return await plain(request)
    return handle


async def test_an_adapter_no_replica_can_load_is_a_422_saying_why_from_the_first_replica() -> None:
    """An adapter that cannot load (rank above maxRank, another base model's weights) was Ray's
    500 at every replica with adapters, then 502 upstream_failed, each attempt counted as a
    failover; it is now a 422 saying why from the first replica, the replica kept in rotation,
    no failover counted and no bucket or path told to the caller."""
    failing = {"tenant-big": ray_500(lambda: resolve_lora(RANK)), "tenant-other": ray_500(lambda: resolve_lora(OTHER_BASE))}
    asked: list[tuple[str, str]] = []  # from Berlin, Paris is nearer than Lyon
    registry = CollectorRegistry()
    async with replica(ray_llm_failing("dc-paris", failing, asked)) as paris, \
            replica(ray_llm_failing("dc-lyon", failing, asked)) as lyon:
        table = endpoints.EndpointTable(ejecting_500s=2)  # three 500s of a replica's own would take it out
        table.replace(support_at(paris, lyon))
        async with gateway_app(table, registry=registry) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            refusals = {}
            for adapter, stream in (("tenant-big", False), ("tenant-big", True), ("tenant-other", False)):
                with pytest.raises(openai.UnprocessableEntityError) as refused:
                    await sdk.chat.completions.create(model=f"support:{adapter}", messages=USER, stream=stream, extra_headers=BERLIN)
                refusals[adapter] = refused.value
            found = await sdk.chat.completions.with_raw_response.create(model="support:tenant-a", messages=USER, extra_headers=BERLIN)
            await sdk.close()
    for adapter, refused in refusals.items():
        assert f"adapter '{adapter}' of model 'support' cannot be loaded" in refused.message
        assert refused.body["code"] == "adapter_not_loadable" and refused.body["param"] == "model"  # type: ignore[index]
        assert "s3://" not in refused.message and "/tmp" not in refused.message and "Internal Server Error" not in refused.message
    assert "its rank 64 is above the model's llm.lora.maxRank 16" in refusals["tenant-big"].message
    assert "expected target modules in ['q_proj', 'v_proj'] but received ['query_key_value']" in refusals["tenant-other"].message
    assert "base model" in refusals["tenant-other"].message
    assert found.headers["x-edgeplane-site"] == "dc-paris"  # three 500s of Ray's did not take Paris out of rotation
    assert [site for site, _ in asked] == ["dc-paris"] * 4
    scraped = generate_latest(registry).decode()
    assert "edgeplane_gateway_failovers_total{" not in scraped
    assert 'edgeplane_gateway_requests_total{code="422",model="support",site="dc-paris"} 3.0' in scraped


async def test_an_adapter_still_downloading_on_the_node_is_a_503_to_retry(tmp_path: pathlib.Path) -> None:
    """Ray's downloadTimeoutSeconds bounds only the wait for another request's download of the
    adapter on the replica's node (its lock), which may finish a moment later: that 500 was
    told as a 422 that no replica loads the adapter; it is a 503 adapter_unavailable with a
    Retry-After, from the first replica, which stays in rotation, and no bucket or path told."""
    failing = {"tenant-slow": ray_500(lambda: download_not_finished(tmp_path))}
    asked: list[tuple[str, str]] = []
    registry = CollectorRegistry()
    async with replica(ray_llm_failing("dc-paris", failing, asked)) as paris, \
            replica(ray_llm_failing("dc-lyon", failing, asked)) as lyon:
        table = endpoints.EndpointTable(ejecting_500s=1)  # one 500 of a replica's own would take it out
        table.replace(support_at(paris, lyon))
        async with gateway_app(table, registry=registry) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            waits = []
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as unavailable:
                    await sdk.chat.completions.create(model="support:tenant-slow", messages=USER, stream=stream, extra_headers=BERLIN)
                waits.append(unavailable.value)
            found = await sdk.chat.completions.with_raw_response.create(model="support:tenant-a", messages=USER, extra_headers=BERLIN)
            await sdk.close()
    for waited in waits:
        assert waited.status_code == 503 and waited.response.headers["retry-after"] == str(adapter_refusals.RETRY_AFTER_S)
        assert waited.body["code"] == "adapter_unavailable" and waited.body["param"] == "model"  # type: ignore[index]
        assert "adapter 'tenant-slow' of model 'support' cannot be loaded now" in waited.message
        assert "still downloading" in waited.message
        assert "s3://" not in waited.message and "/tmp" not in waited.message
    assert found.headers["x-edgeplane-site"] == "dc-paris"
    assert [site for site, _ in asked] == ["dc-paris"] * 3
    scraped = generate_latest(registry).decode()
    assert "edgeplane_gateway_failovers_total{" not in scraped
    assert 'edgeplane_gateway_requests_total{code="503",model="support",site="dc-paris"} 2.0' in scraped


async def test_a_500_too_long_for_a_refusal_is_the_replicas_own_and_not_read_whole() -> None:
    """A replica's 500 is read for Ray's refusal of the adapter up to adapter_refusals.LONGEST_ANSWER
    bytes: a longer one (no traceback of Ray's is that long) was read whole, up to the pool's
    64 MiB, and taken for a refusal; it is the replica's own fault, and the next replica is asked."""
    padded = json.loads(ray_500(lambda: resolve_lora(RANK)))
    padded["error"]["message"] = "x" * adapter_refusals.LONGEST_ANSWER + padded["error"]["message"]
    asked: list[tuple[str, str]] = []
    async with replica(ray_llm_failing("dc-paris", {"tenant-big": json.dumps(padded).encode()}, asked)) as paris, \
            replica(ray_llm_failing("dc-lyon", {}, asked)) as lyon:
        table = endpoints.EndpointTable()
        table.replace(support_at(paris, lyon))
        async with gateway_app(table) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            answer = await sdk.chat.completions.with_raw_response.create(model="support:tenant-big", messages=USER, extra_headers=BERLIN)
            await sdk.close()
    assert answer.headers["x-edgeplane-site"] == "dc-lyon"


async def test_a_replicas_own_500_for_an_adapter_still_moves_on() -> None:
    """A 500 that is not Ray's refusal of the adapter (the engine's own fault) is the replica's:
    the next replica with adapters is asked, as before."""
    asked: list[tuple[str, str]] = []
    registry = CollectorRegistry()
    async with replica(ray_llm_failing("dc-paris", {"tenant-a": ray_500(engine_fault)}, asked)) as paris, \
            replica(ray_llm_failing("dc-lyon", {}, asked)) as lyon:
        table = endpoints.EndpointTable()
        table.replace(support_at(paris, lyon))
        async with gateway_app(table, registry=registry) as app, serving(app) as port:
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0, timeout=30)
            answer = await sdk.chat.completions.with_raw_response.create(model="support:tenant-a", messages=USER, extra_headers=BERLIN)
            await sdk.close()
    assert answer.headers["x-edgeplane-site"] == "dc-lyon"
    assert asked == [("dc-paris", "org/support:tenant-a"), ("dc-lyon", "org/support:tenant-a")]
    assert 'edgeplane_gateway_failovers_total{model="support",site="dc-paris"} 1.0' in generate_latest(registry).decode()


def _download_lora() -> None:
    """A download of Ray's LoRA loader that its storage refused (each of its attempts)."""
    raise OSError("When reading information for key 'support/tenant-x' in bucket 'acme-adapters': AWS Error ACCESS_DENIED")


@pytest.mark.parametrize(("answer", "status", "cause"), [
    (ray_500(lambda: resolve_lora(RANK)), 422, "its rank 64 is above the model's llm.lora.maxRank 16"),
    (ray_500(lambda: resolve_lora("Loading lora support:x failed: No adapter found for /tmp/ray/llm/lora/cache/x")),
     422, "the engine refused it: Loading lora support:x failed: No adapter found for <its local copy>"),
    (ray_500(lambda: resolve_lora("bad weights in s3://acme/x/adapter_model.safetensors")),
     422, "the engine refused it: bad weights in <its bucket>"),
    (ray_500(_download_lora), 503, "its files could not be downloaded from the model's llm.lora.adaptersFrom"),
    (ray_500(engine_fault), None, None),
    (b'{"error": {"message": "Internal Server Error", "code": 500}}', None, None),
    (b"Internal Server Error", None, None),
    (b'{"error": "Failed to load lora model: x"}', None, None),
    (b"[]", None, None),
])
def test_rays_refusal_of_an_adapter_is_told_from_its_500(answer: bytes, status: int | None, cause: str | None) -> None:
    said = adapter_refusals.cause(answer)
    if cause is None:
        assert said is None
    else:
        assert said is not None and said.status == status and cause in said.why
        assert "acme" not in said.why
