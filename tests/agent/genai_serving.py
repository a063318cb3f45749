"""What the generative-model tests of this folder share: two tiny chat packages (one fast, one
slow enough to interrupt), an agent serving one of them behind the official ``openai`` SDK,
and the waits on what the agent reports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from orchestrator.agents import model
from orchestrator.testing import genai_model

from .conftest import SITE, ArtifactServer, ControlPlane, MakeAgent

MODEL = "chat"
USER = [{"role": "user", "content": "Where does the model run?"}]


@dataclass(frozen=True)
class Packages:
    small: genai_model.GenAIModel  # context 256, fast
    slow: genai_model.GenAIModel  # context 4096, with per-token compute: long generations to interrupt
    small_url: str
    slow_url: str


def build_packages(artifact_server: ArtifactServer) -> Packages:
    small = genai_model.build_package(artifact_server.root, name="tiny-chat")
    slow = genai_model.build_package(artifact_server.root, name="slow-chat", context_length=4096, ffn_layers=4, ffn_repeat=32,
                                     embed_dim=256, ffn_dim=1024, seed=1)
    return Packages(small, slow, artifact_server.url("tiny-chat.tar"), artifact_server.url("slow-chat.tar"))


def assignment(url: str, sha256: str, *, concurrent: int = 4, queued: int = 16) -> model.Assignment:
    return model.Assignment(MODEL, "assistant", "small", url, sha256, runtime="onnx-genai",
                            max_concurrent_sequences=concurrent, max_queued=queued)


async def wait_state(cp: ControlPlane, predicate) -> model.ModelState:
    def match(event: model.AgentEvent) -> bool:
        state = event.status.models.get(MODEL)
        return event.kind is model.AgentEventKind.MODELS_CHANGED and state is not None and predicate(state)

    return (await cp.events.wait_for(match, timeout=30)).status.models[MODEL]


@dataclass
class Serving:
    agent: object
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.http.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


async def serve(cp: ControlPlane, make_agent: MakeAgent, url: str, sha256: str, **limits: int) -> AsyncIterator[Serving]:
    agent = await make_agent(cp)
    await cp.events.wait_for(lambda e: e.kind is model.AgentEventKind.JOINED)
    cp.hub.set_assignments(SITE, [assignment(url, sha256, **limits)], version=1)
    await wait_state(cp, lambda s: s.serving_sha256 == sha256)
    client = openai.AsyncOpenAI(base_url=f"{agent.endpoint_url}/v1", api_key="unused", max_retries=0, timeout=30)
    async with httpx.AsyncClient(base_url=agent.endpoint_url, timeout=30) as http:
        yield Serving(agent, client, http)
    await client.close()


def chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def token_count(pkg: genai_model.GenAIModel, text: str) -> int:
    return len(Tokenizer.from_file(str(pkg.directory / "tokenizer.json")).encode(text).ids)
