"""GPU check: a vllm variant deployed by edgeplane on a local Ray streams an answer, and
what that path costs in tokens/s against vLLM alone.

Needs an NVIDIA GPU (``nvidia-smi``) and vLLM with Ray Serve LLM installed
(``pip install 'ray[serve,llm]' vllm`` in this environment); anywhere else it prints why it
skips and exits 0. Nothing is downloaded: the model is built here, a small Llama-shaped
network with random weights (seeded) and a byte-level BPE tokenizer trained on generated
text, saved in Hugging Face format. Its answers are gibberish; its tokens are real work.

- **edgeplane**: a ``runtime: vllm`` Model variant goes through the same code as a
  manifest (``applications.llm_app`` -> ``ServeAppSpec`` -> ``build_openai_app`` config),
  deployed by ``RayServeActuator`` to a local Ray started with the GPU, then one answer is
  streamed with the ``openai`` SDK from the application's route prefix (the endpoint the
  gateway routes OpenAI requests to).
- **baseline**: vLLM alone (``vllm.LLM``) in a separate process, same model, same
  sampling (greedy, ``ignore_eos``, same token count), after one warm-up generation.

Run::

    .venv/bin/python -m bench.vllm_gpu [--quick] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "vllm_gpu.json"
PROMPT = "Tell me about the placement of replicas in a data centre."
GPU_MEMORY_UTILIZATION = 0.3  # the model is tiny; leave room for the other engine


def nvidia_smi(args: list[str], timeout_s: float) -> tuple[int | None, str]:
    """``nvidia-smi``'s exit code and what it wrote; (None, why) when it did not answer (a
    driver stuck on a lost GPU hangs it) or cannot run."""
    try:
        proc = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"nvidia-smi did not answer in {timeout_s:g} s"
    except OSError as exc:
        return None, f"nvidia-smi cannot run: {exc}"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def skip_reason(nvidia_smi_timeout_s: float = 30.0) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    code, said = nvidia_smi(["-L"], nvidia_smi_timeout_s)
    if code is None:
        return said
    if code != 0 or "GPU" not in said:
        return f"nvidia-smi lists no GPU: {said[:200]}"
    for module in ("vllm", "torch", "transformers", "tokenizers", "openai"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'ray[serve,llm]' vllm openai)"
    return None


def build_model(path: pathlib.Path, quick: bool) -> dict[str, Any]:
    """A small Llama in Hugging Face format, random weights (seed 0), own tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["replica", "site", "region", "model", "latency", "carbon", "placement", "gpu", "memory", "token",
             "cluster", "edge", "data", "centre", "serve", "route", "the", "a", "of", "to", "and", "in"]
    corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    fast.save_pretrained(path)
    torch.manual_seed(0)
    layers = 4 if quick else 12
    config = LlamaConfig(vocab_size=len(fast), hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"layers": layers, "kv_heads": 4, "head_dim": 64, "weight_bytes": weight_bytes, "parameters": sum(p.numel() for p in model.parameters())}


BASELINE = """
import json, sys, time
from vllm import LLM, SamplingParams
path, tokens = sys.argv[1], int(sys.argv[2])
llm = LLM(model=path, max_model_len=2048, gpu_memory_utilization={util}, dtype="bfloat16", seed=0)
params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
messages = [{{"role": "user", "content": {prompt!r}}}]
llm.chat(messages, params)  # warm-up
started = time.perf_counter()
out = llm.chat(messages, params)
elapsed = time.perf_counter() - started
print(json.dumps({{"tokens": len(out[0].outputs[0].token_ids), "seconds": elapsed}}))
"""


def run_baseline(path: pathlib.Path, tokens: int) -> dict[str, float]:
    code = BASELINE.format(util=GPU_MEMORY_UTILIZATION, prompt=PROMPT)
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tokens)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM alone failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


async def run_edgeplane(path: pathlib.Path, shape: dict[str, Any], tokens: int) -> dict[str, float]:
    from openai import AsyncOpenAI

    from orchestrator.adapters import local_ray, ray_serve
    from orchestrator.adapters.serve_config import ServeAppSpec
    from orchestrator.manifests import schema
    from orchestrator.reconciler import applications, inventory

    variant = schema.Variant.model_validate({
        "name": "tiny", "runtime": "vllm", "resources": {"cpu": 1},
        "llm": {"source": str(path), "servedModelName": "tiny-llama", "contextLength": 2048, "maxConcurrentSequences": 8,
                "dtype": "bfloat16", "gpuMemoryUtilization": GPU_MEMORY_UTILIZATION, "weightBytes": shape["weight_bytes"],
                "engineArgs": {"seed": 0},
                "architecture": {"layers": shape["layers"], "kvHeads": shape["kv_heads"], "headDim": shape["head_dim"]}},
    })
    assert variant.llm is not None
    memory = inventory.llm_memory(variant.llm)
    llm = applications.llm_app(variant.llm, "tiny")
    spec = ServeAppSpec(name="ep-tiny", route_prefix="/ep/bench/tiny", model_name="tiny", runtime="vllm",
                        num_replicas=1, cpu=1, gpus=float(llm.gpus), llm=llm)
    cluster = local_ray.LocalRayCluster(num_gpus=1, startup_timeout_s=180)
    endpoints = await cluster.start_async()
    try:
        actuator = endpoints.actuator()
        deploy_started = time.perf_counter()
        await actuator.apply([spec])
        statuses = await ray_serve.wait_until_running(actuator, [spec.name], timeout_s=900, poll_interval_s=1.0)
        ready_s = time.perf_counter() - deploy_started
        url = statuses[spec.name].endpoint_url
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="not-needed", timeout=300)
        messages = [{"role": "user", "content": PROMPT}]
        extra = {"ignore_eos": True}
        await client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=tokens,  # type: ignore[arg-type]
                                             temperature=0, extra_body=extra)  # warm-up
        started = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        usage = None
        stream = await client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=tokens,  # type: ignore[arg-type]
                                                      temperature=0, stream=True, stream_options={"include_usage": True},
                                                      extra_body=extra)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        elapsed = time.perf_counter() - started
        await client.close()
        await actuator.apply([])
        await actuator.close()
        return {"tokens": usage.completion_tokens if usage else len(text), "seconds": elapsed,
                "ttft_s": (first or started) - started, "ready_s": ready_s, "chunks": len(text),
                "planned_gib_per_gpu": memory.per_gpu_gib}
    finally:
        await cluster.stop_async()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vllm_gpu")
    p.add_argument("--quick", action="store_true", help="a smaller model")
    p.add_argument("--tokens", type=int, default=256, help="tokens to generate per answer")
    args = p.parse_args()
    reason = skip_reason()
    if reason:
        print(f"SKIP bench.vllm_gpu: {reason}")
        return 0
    code, gpu = nvidia_smi(["--query-gpu=name,memory.total", "--format=csv,noheader"], 30.0)  # before the run: its results are not lost to a hang
    if code != 0:
        gpu = ""
    with tempfile.TemporaryDirectory(prefix="ep-vllm-") as tmp:
        path = pathlib.Path(tmp) / "tiny-llama"
        shape = build_model(path, args.quick)
        baseline = run_baseline(path, args.tokens)
        edgeplane = asyncio.run(run_edgeplane(path, shape, args.tokens))
    rows = [("vLLM alone", baseline), ("edgeplane (Ray Serve LLM, streamed)", edgeplane)]
    print(f"\n{'path':<40} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for name, r in rows:
        print(f"{name:<40} {int(r['tokens']):>7} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>9.1f}")
    ratio = (edgeplane["tokens"] / edgeplane["seconds"]) / (baseline["tokens"] / baseline["seconds"])
    print(f"edgeplane / vLLM alone: {ratio:.2f}; first token after {edgeplane['ttft_s'] * 1000:.0f} ms; "
          f"RUNNING {edgeplane['ready_s']:.0f} s after apply")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"gpu": gpu, "python": platform.python_version(), "model": shape, "tokens": args.tokens,
                                   "baseline": baseline, "edgeplane": edgeplane, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
