"""``runtime: onnx-genai`` variants: strict validation and the memory placement counts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.manifests import schema
from orchestrator.reconciler import inventory
from orchestrator.scheduler.model import Tier

SHA = "a" * 64
GEN = {"parameters": 135_000_000, "weightBytes": 270_000_000, "contextLength": 2048, "kvBytesPerToken": 46080,
       "maxConcurrentSequences": 4}


def variant(**over):
    doc = {"name": "small", "runtime": "onnx-genai", "artifact": {"uri": "m.tar", "sha256": SHA}, "generative": dict(GEN)}
    doc.update(over)
    return schema.Variant.model_validate(doc)


def test_memory_need_is_weights_plus_a_full_kv_cache_per_sequence():
    v = variant()
    need = 270_000_000 + 46080 * 2048 * 4
    assert v.generative.memory_bytes() == need
    assert v.memory_mib() == -(-need // (1024 * 1024))
    sched = inventory.to_variant(v)
    assert sched.memory_mib == v.memory_mib()
    assert sched.runs_on(Tier.EDGE) and sched.runs_on(Tier.DATACENTER)


def test_on_a_gpu_the_need_is_gpu_memory():
    v = variant(resources={"gpus": 1, "memoryMiB": 1024})
    assert v.memory_mib() == 1024
    assert v.gpu_memory_gib() == pytest.approx((270_000_000 + 46080 * 2048 * 4) / 2**30)


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"generative": None}, "needs 'generative'"),
        ({"artifact": None}, "needs 'artifact'"),
        ({"resources": {"gpus": 1, "gpuMemoryGiB": 0.1}}, "gpuMemoryGiB (0.1) is below"),
        ({"generative": {**GEN, "kvBytesPerToken": 0}}, "greater than 0"),
        ({"generative": {**GEN, "contextLength": "2048"}}, "valid integer"),
        ({"generative": {**GEN, "extra": 1}}, "Extra inputs"),
        ({"importPath": "a.b:c"}, "'importPath' is for ray-serve"),
    ],
)
def test_bad_generative_variants_are_refused_with_the_reason(over, words):
    with pytest.raises(ValidationError) as info:
        variant(**over)
    assert words in str(info.value)


def test_generative_block_only_on_onnx_genai():
    with pytest.raises(ValidationError, match="'generative' is for onnx-genai"):
        schema.Variant.model_validate({"name": "x", "runtime": "onnx", "artifact": {"uri": "m.onnx", "sha256": SHA}, "generative": GEN})


def test_explicit_memory_above_the_need_stands_and_below_it_is_raised():
    assert variant(resources={"memoryMiB": 4096}).memory_mib() == 4096
    assert variant(resources={"memoryMiB": 100}).memory_mib() == variant().memory_mib() > 100


def test_a_stored_spec_with_its_defaults_parses_back_to_the_same_needs():
    for v in (variant(), variant(resources={"gpus": 1}), variant(resources={"gpus": 1, "gpuMemoryGiB": 80})):
        again = schema.Variant.model_validate(v.model_dump())
        assert (again.memory_mib(), again.gpu_memory_gib()) == (v.memory_mib(), v.gpu_memory_gib())


def test_placement_counts_the_kv_cache_as_memory_and_gpu_memory():
    from orchestrator.scheduler import model as sched
    from orchestrator.scheduler import planner

    # 2 GiB of weights + 64 KiB/token x 8192 tokens = 0.5 GiB of KV cache per sequence.
    gen = {"parameters": 1_000_000_000, "weightBytes": 2 * 2**30, "contextLength": 8192, "kvBytesPerToken": 65536}
    edge = sched.Site("edge-a", "edge", "FR", "eu-west", 48.0, 2.0, cpu=8, memory_gib=5)
    dc = sched.Site("dc-a", "datacenter", "FR", "eu-west", 48.0, 2.0, cpu=64, memory_gib=256, gpus=(sched.GpuGroup("L4", 1, 24),))

    def placed(site, concurrency: int, **resources) -> int:
        v = variant(generative={**gen, "maxConcurrentSequences": concurrency}, resources={"cpu": 1, **resources})
        d = sched.Deployment("d", "m", (inventory.to_variant(v),), 1, 1)
        return sum(planner.plan([site], [d]).counts().values())

    assert placed(edge, 4) == 1  # 2 + 4 x 0.5 = 4 GiB of a 5 GiB site
    assert placed(edge, 8) == 0  # 6 GiB: not placed
    assert placed(dc, 40, gpus=1) == 1  # 22 GiB of GPU memory on a 24 GiB L4
    assert placed(dc, 48, gpus=1) == 0  # 26 GiB: not placed


def test_the_example_in_the_manifests_doc_loads_and_its_memory_figure_is_what_placement_counts():
    import pathlib
    import re

    from orchestrator.manifests import loader

    text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "manifests.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "runtime: onnx-genai" in b)
    block = re.sub(r"sha256: [^,}\n]+", f"sha256: {SHA}", block)  # the doc shortens the digest
    v = loader.load_text(block, "manifests.md")[0].doc.spec.variants[0]
    figures = re.search(r"\(above: ([\d,]+) \+ ([\d,]+) × ([\d,]+) × ([\d,]+) = ([\d,]+) bytes = (\d+) MiB\)", text)
    assert figures, "the arithmetic under the example is gone or reworded"
    weights, per_token, context, sequences, total, mib = (int(g.replace(",", "")) for g in figures.groups())
    g = v.generative
    assert (weights, per_token, context, sequences) == (g.weightBytes, g.kvBytesPerToken, g.contextLength, g.maxConcurrentSequences)
    assert (total, mib) == (g.memory_bytes(), v.memory_mib())
