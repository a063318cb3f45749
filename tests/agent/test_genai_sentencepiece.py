"""The text of a model with a SentencePiece-style vocabulary (Llama 2, Mistral, Gemma: ``▁``
for spaces, byte fallback ``<0xE2>`` for characters not in it), on an agent, through the
official ``openai`` SDK, streamed and not.

The model (``orchestrator.testing.genai_spm_model``) writes tokens fixed in advance after a
prompt of a given length, so each test knows the tokens of the answer and asks for its
exact text: what the tokens add to the prompt's text as ``tokenizers`` decodes it, with one
U+FFFD for each run of bytes that make no character (Python's UTF-8 decoder, as for a
byte-level vocabulary: ``test_genai_openai``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tokenizers import Tokenizer

from orchestrator.testing import genai_model, genai_spm_model

from .conftest import ArtifactServer, ControlPlane, MakeAgent
from .genai_serving import MODEL, Serving, serve

#: After "The edge site" (3 tokens): spaces as ``▁`` (before a word, alone, two in a row),
#: characters of 3 and 4 bytes by byte fallback ("日", "€", an emoji), "本" a token of its
#: own, ASCII by byte fallback ("5", ",").
WHOLE_PROMPT = "The edge site"
WHOLE = ["▁The", "▁edge", "▁site", "▁serves", "▁", "<0xE6>", "<0x97>", "<0xA5>", "本", "▁", "▁at", "▁", "<0x35>",
         "<0xE2>", "<0x82>", "<0xAC>", "<0x2C>", "▁and", "▁tokens", "<0xF0>", "<0x9F>", "<0x98>", "<0x8A>"]
#: After 32 words: bytes that make no character (a model sampled hot writes them), each
#: before more text: a lead byte, one before a newline, a lone continuation byte, a NUL, and
#: an emoji's first two bytes at the end.
BROKEN_PROMPT = " ".join(["the"] * 32)
BROKEN = ["▁the", "<0xE2>", "▁and", "<0xC3>", "<0x0A>", "▁load", "<0xA9>", "▁is", "<0x00>", "▁at", "<0xF0>", "<0x9F>"]


@pytest.fixture(scope="module")
def spm_package(artifact_server: ArtifactServer) -> genai_model.GenAIModel:
    return genai_spm_model.build_package(artifact_server.root, {3: WHOLE, 32: BROKEN})


@pytest.fixture
async def spm(control_plane: ControlPlane, make_agent: MakeAgent, artifact_server: ArtifactServer,
              spm_package: genai_model.GenAIModel) -> AsyncIterator[Serving]:
    async for s in serve(control_plane, make_agent, artifact_server.url(spm_package.package.name), spm_package.sha256):
        yield s


async def _answers(serving: Serving, prompt: str) -> tuple[str, str]:
    """The answer's text whole, and streamed (its chunks joined), after ``prompt``, greedy."""
    asked = {"model": MODEL, "prompt": prompt, "max_tokens": 64, "temperature": 0}
    whole = await serving.client.completions.create(**asked)
    assert whole.choices[0].finish_reason == "stop" and whole.usage.prompt_tokens == len(prompt.split())
    chunks = [c async for c in await serving.client.completions.create(**asked, stream=True)]
    return whole.choices[0].text, "".join(c.choices[0].text for c in chunks if c.choices)


async def test_characters_split_into_byte_tokens_and_spaces_come_out_exactly(spm: Serving,
                                                                            spm_package: genai_model.GenAIModel) -> None:
    tok = Tokenizer.from_file(str(spm_package.directory / "tokenizer.json"))
    prompt = tok.encode(WHOLE_PROMPT).ids
    assert tok.decode(prompt) == WHOLE_PROMPT
    expected = tok.decode(prompt + [tok.token_to_id(p) for p in WHOLE])[len(WHOLE_PROMPT):]
    assert expected == " The edge site serves 日本  at 5€, and tokens😊"  # the test asks what it means to
    whole, streamed = await _answers(spm, WHOLE_PROMPT)
    assert whole == expected
    assert streamed == expected


async def test_text_after_bytes_that_make_no_character_is_not_lost(spm: Serving) -> None:
    """onnxruntime-genai's stream decoder dropped the text after such bytes (" and" became
    "nd", the newline and " load" went) and wrote no U+FFFD for them."""
    expected = " the\ufffd and\ufffd\n load\ufffd is\x00 at\ufffd"
    whole, streamed = await _answers(spm, BROKEN_PROMPT)
    assert whole == expected
    assert streamed == expected
