"""A generative model's load and steps leave the interpreter to the agent's other threads.

onnxruntime-genai's Python binding holds the GIL through a whole model load and through each
step; the agent calls its C API instead (``edge_agent.runtime.oga``), which releases it. The
tests run with a switch interval of 100 s, so that another thread runs only where the
working thread gives the GIL up itself: while a call into the library holds it, a ticking
thread cannot tick."""

from __future__ import annotations

import contextlib
import pathlib
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from edge_agent.runtime import genai
from orchestrator.testing import genai_model


@pytest.fixture(scope="module")
def step_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A model whose load takes tens of milliseconds and whose steps take milliseconds here."""
    return genai_model.build_model_dir(tmp_path_factory.mktemp("genai") / "step", context_length=256, ffn_layers=8,
                                       embed_dim=512, ffn_dim=2048, seed=5)


class Ticker:
    """A thread that notes the time, then sleeps 0.2 ms, until stopped."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.times.append(time.perf_counter())
            time.sleep(0.0002)

    @contextlib.contextmanager
    def running(self) -> Iterator[Ticker]:
        before = sys.getswitchinterval()
        sys.setswitchinterval(100)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            sys.setswitchinterval(before)
            self._thread.join(timeout=10)


def test_other_threads_run_while_a_generation_steps(step_model: pathlib.Path) -> None:
    model = genai.GenAIModel.load(step_model)
    ticks_at_token: list[int] = []
    with Ticker().running() as ticker:
        finished = model.generate(model.encode("The agent"), genai.SamplingOptions(max_tokens=20, temperature=0),
                                  lambda event: ticks_at_token.append(len(ticker.times)), genai.Cancel())
    assert finished.completion_tokens == 20
    # Holding the GIL through its steps, the generation would have let the ticker tick
    # nowhere between its first token and its last.
    assert ticks_at_token[-1] > ticks_at_token[0]


def test_other_threads_run_while_a_model_loads(step_model: pathlib.Path) -> None:
    largest_share = 1.0
    for _ in range(3):  # the best of three: a busy machine may keep the ticker off a core once
        with Ticker().running() as ticker:
            start = time.perf_counter()
            genai.GenAIModel.load(step_model)
            end = time.perf_counter()
        inside = [start] + [t for t in ticker.times if start < t < end] + [end]
        longest_pause = max(b - a for a, b in zip(inside, inside[1:], strict=False))
        largest_share = min(largest_share, longest_pause / (end - start))
    # The library's model load is most of this load: held under the GIL, the ticker would
    # pause for most of it.
    assert largest_share < 0.5


def test_the_c_api_reads_and_generates_as_the_python_binding_does(tmp_path: pathlib.Path) -> None:
    import numpy as np
    import onnxruntime_genai as og

    from edge_agent.runtime import oga

    folder = genai_model.build_model_dir(tmp_path / "m", seed=3)
    ours = oga.Model(folder)
    theirs = og.Model(str(folder))
    their_tokenizer = og.Tokenizer(theirs)
    messages = '[{"role": "user", "content": "Which site answers?"}]'
    prompt = ours.tokenizer.apply_chat_template(messages)
    assert prompt == their_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ours.tokenizer.encode(prompt)
    assert ids.dtype == np.int32 and ids.tolist() == their_tokenizer.encode(prompt).tolist()
    assert ours.tokenizer.decode(ids) == their_tokenizer.decode(ids)
    assert ours.tokenizer.eos_token_ids == frozenset(int(t) for t in their_tokenizer.eos_token_ids)

    generator = oga.Generator(ours, {"max_length": 64, "do_sample": False})
    params = og.GeneratorParams(theirs)
    params.set_search_options(max_length=64, do_sample=False)
    their_generator = og.Generator(theirs, params)
    generator.append_tokens(ids)
    their_generator.append_tokens(ids)
    stream, their_stream = oga.TokenizerStream(ours.tokenizer), their_tokenizer.create_stream()
    text, their_text = "", ""
    for _ in range(12):
        logits = generator.logits()
        assert logits.dtype == np.float32 and np.array_equal(logits, their_generator.get_logits())
        generator.generate_next_token()
        their_generator.generate_next_token()
        token = generator.next_token()
        assert token == int(their_generator.get_next_tokens()[0])
        assert generator.is_done() is their_generator.is_done()
        text += stream.decode(token)
        their_text += their_stream.decode(token)
    assert text and text == their_text
    generator.close()
    generator.close()  # closing twice frees once


def test_a_step_the_library_refuses_is_an_error_with_its_message(tmp_path: pathlib.Path) -> None:
    from edge_agent.runtime import oga

    model = oga.Model(genai_model.build_model_dir(tmp_path / "m", eos_bias=-1000.0))
    ids = model.tokenizer.encode("which site answers")
    for step_s in (None, oga.HOLD_GIL_BELOW_S / 10):  # the step that releases the GIL, then the one that keeps it
        generator = oga.Generator(model, {"max_length": len(ids) + 1, "do_sample": False})
        generator.append_tokens(ids)
        model.step_s = step_s
        generator.generate_next_token()
        assert generator.next_token() >= 0 and generator.is_done()  # at max_length
        model.step_s = step_s
        with pytest.raises(oga.OgaError, match="max_length"):
            generator.generate_next_token()
        generator.close()


def test_a_model_the_library_cannot_load_is_a_load_error_with_its_message(tmp_path: pathlib.Path) -> None:
    from edge_agent import errors

    folder = genai_model.build_model_dir(tmp_path / "m")
    (folder / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(errors.ModelLoadError, match="onnxruntime-genai could not load the model: .*\\S"):
        genai.GenAIModel.load(folder)
    (folder / "genai_config.json").write_text("{")
    with pytest.raises(errors.ModelLoadError, match="onnxruntime-genai could not load the model"):
        genai.GenAIModel.load(folder)
