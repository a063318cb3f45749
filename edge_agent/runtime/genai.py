"""The only module that touches onnxruntime-genai: load a generative model, generate tokens.

onnxruntime-genai owns the KV cache, the sampling (greedy, temperature, top-p, seed) and
the tokenizer (``tokenizer.json``, and the chat template of ``tokenizer_config.json``).
This module adds what a server needs around its ``Generator`` loop:

- one sequence runs on a worker thread, one ``generate_next_token`` at a time, and hands
  each token to the caller's ``emit`` as it is produced; between two steps it checks a
  cancel flag, so a client that went away stops its generation within one step;
- the prompt is read (prefilled) in chunks of at most ``prefill_chunk`` tokens, the cancel
  flag checked between two: a prompt of thousands of tokens takes seconds on an edge CPU,
  and read at once it held the model's slot (and the requests queued behind it) to the end
  for a client that had left. The library's generator takes ``append_tokens`` again and
  again, extending its KV cache: the logits, and so a greedy answer, are those of one
  append (``tests/agent/test_genai_units.py``), for about the same time;
- stop strings are matched here, in the generating thread, so generation ends on the
  token that completes one and the text before it is all that is sent (text that could be
  the start of a stop string is held back until it cannot be);
- the text of tokens that are parts of a character (or hold a NUL byte) is read here from
  their bytes, in a byte-level vocabulary and in one with byte fallback (:class:`TextStream`):
  the library's stream decoder dropped the text after bytes that make no character, and
  the NUL;
- log-probabilities come from the step's logits (a log-softmax over the vocabulary),
  computed only when asked for, with each token's own bytes (``runtime.token_bytes``: the
  library decodes a token that is part of a character, a special token or a NUL to U+FFFD).

A model loads on CUDA or the CPU as its :class:`LoadOptions` say: the agent decides, once,
whether it has a GPU (``capacity``), and gives CUDA only there and only where the installed
onnxruntime-genai has it (``onnxruntime-genai-cuda``, the ``gpu`` extra). This module does
not look for a GPU itself: a device file says nothing of the GPUs ``CUDA_VISIBLE_DEVICES``
leaves to the agent, and a model asked for CUDA where it has none failed at every attempt.

The library is called through its C API (``runtime.oga``), which releases the GIL while a
model loads, a prompt is read and each step runs: its Python binding kept the GIL for all of
these, so the event loop, other models' requests and the agent's heartbeats waited behind
each step of a generation and behind a whole model load.

A streamed sequence runs inside a :class:`Window`: its first token waits until the event
loop has written it (time to first token), and after that the thread runs at most
``Window.ahead`` tokens ahead of what the loop has written, then blocks until the loop
catches up. A reader that stops reading stops the generation within that many tokens, and
tokens per second stay those of the bare loop while the consumer keeps up. (A token the
generating thread writes to the connection itself, ``generation._Sequence``, counts as
written at once.) ``bench/genai_agent.py`` measures both.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import pathlib
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_agent import errors
from edge_agent.runtime import oga, onnx, token_bytes

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: The most prompt tokens read in one call (see the module docstring). With the test
#: model's slow variant here (``slow-chat`` of ``tests/agent/test_genai_openai.py``) a prompt
#: of 2,992 tokens took 4.0 s in chunks of 256 against 4.5 s at once (medians of three), and
#: a cancel set 0.5 s in ended it at 0.7 s against 5.1 s.
PREFILL_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # sample among this many likeliest tokens (0: all)
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the text less likely
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class Piece:
    """A token as logprobs show it: its text, and its own bytes (None: not known). One that
    is only part of a character shows as its bytes (``bytes:\\xc3``), as OpenAI's does."""

    text: str
    raw: bytes | None


@dataclass(frozen=True)
class TokenEvent:
    text: str  # text to send now (may be "" while a possible stop string is held back)
    token_id: int
    token: Piece | None = None  # this token's own, for logprobs
    logprob: float | None = None
    top: tuple[tuple[Piece, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of sequence or a stop string), "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # held-back text released at the end (no stop string completed)


@dataclass
class Cancel:
    event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        self.event.set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()


class Window:
    """How far a generating thread may run ahead of its consumer (see the module docstring).

    The thread calls :meth:`wait` after each token it produced; the consumer calls
    :meth:`consumed` once it has sent a token, and :meth:`close` when it stops consuming
    (the thread then never blocks again and sees its cancel flag at the next step)."""

    def __init__(self, ahead: int = 16) -> None:
        self.ahead = max(1, ahead)
        self._cond = threading.Condition()
        self._consumed = 0
        self._closed = False

    def wait(self, produced: int) -> None:
        # The first token is sent before the second step starts: that is the time to first token.
        allowed = 0 if produced == 1 else self.ahead
        with self._cond:
            self._cond.wait_for(lambda: self._closed or produced - self._consumed <= allowed)

    def consumed(self, tokens: int = 1) -> None:
        with self._cond:
            self._consumed += tokens
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class StopMatcher:
    """Cuts generated text at the first stop string; holds back a possible prefix of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text to send now, stopped)``."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buf[:cut], True
        keep = 0
        for n in range(min(self._longest - 1, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                keep = n
                break
        self._pending = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The text held back, to send at the end ("" once a stop string was completed)."""
        out, self._pending = self._pending, ""
        return out


def runtime_seed(seed: int) -> int:
    """The library's sampler seed for a caller's ``seed`` (any integer OpenAI's API takes, 64
    bits). The library takes a 32-bit signed ``random_seed`` and seeds at random from any
    negative one: a seed from 0 to 2**31 - 1 is given as it is, and any other is hashed into
    that range, so that distinct seeds sample differently but for a chance of one in two
    billion (masking them to the range made 5 and 2**31 + 5 sample alike), and one seed
    samples alike on every agent (a hash of its bytes, not Python's ``hash``)."""
    if 0 <= seed < 1 << 31:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(16, "little", signed=True), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << 31)


def built_with_cuda() -> bool:
    """Whether the installed onnxruntime-genai was built with CUDA; False where it cannot say."""
    try:
        return oga.cuda_built()
    except Exception:
        return False


@dataclass(frozen=True)
class LoadOptions:
    """How a package is loaded: on CUDA or the CPU (the caller's decision: see the module
    docstring), onnxruntime's thread policy (``onnx.spin_entries``) and threads per session
    (``intra_op_threads``, 0: onnxruntime's default), and the prefill chunk."""

    cuda: bool = False
    spin_between_runs: bool = False
    spin_after_run_us: int = 0
    prefill_chunk: int = PREFILL_CHUNK_TOKENS
    intra_op_threads: int = 0

    @property
    def provider(self) -> str:
        """The execution provider, as a model's state reports it."""
        return CUDA if self.cuda else CPU

    @property
    def providers(self) -> list[str]:
        """onnxruntime-genai's providers for the model's config (none: the CPU)."""
        return ["cuda"] if self.cuda else []

    @property
    def overlay(self) -> dict[str, object] | None:
        """What the model's genai_config.json is overlaid with; None: onnxruntime's own
        threads and thread policy, as the package has them."""
        entries: dict[str, object] = dict(onnx.spin_entries(self.spin_between_runs, self.spin_after_run_us))
        if self.intra_op_threads:
            entries["intra_op_num_threads"] = self.intra_op_threads
        return {"model": {"decoder": {"session_options": entries}}} if entries else None


@dataclass(frozen=True)
class _Vocabulary:
    """What the model's tokenizer.json says that the library does not: the tokens whose
    text it does not decode (parts of a character, special tokens, NUL), as logprobs show
    them; whether it spells out its tokens' bytes in a way :mod:`token_bytes` reads; a
    pattern that finds the text of its special tokens (None: it has none); and, in a
    byte-level vocabulary or one with byte fallback, the bytes of the tokens that are parts
    of a character or hold a NUL, which :class:`TextStream` reads itself."""

    pieces: dict[int, Piece]
    bytes_known: bool
    specials: re.Pattern[str] | None
    partial: dict[int, bytes]


def _vocabulary(directory: pathlib.Path) -> _Vocabulary:
    try:
        tokenizer = json.loads((directory / "tokenizer.json").read_bytes())
    except (OSError, ValueError):  # none: its tokens' text is all there is
        return _Vocabulary({}, False, None, {})
    pieces = {token_id: Piece(text, raw) for token_id, (text, raw) in token_bytes.shown_tokens(tokenizer).items()}
    specials = sorted(set(token_bytes.special_texts(tokenizer)), key=len, reverse=True)  # the longest of overlapping ones
    pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
    return _Vocabulary(pieces, token_bytes.spells_bytes(tokenizer), pattern, token_bytes.stream_tokens(tokenizer))


class TextStream:
    """The answer's text token by token. The library's stream decoder holds the bytes of an
    unfinished character, and when the next token does not finish it (a model sampled hot
    writes 0xC3 then "a"), it dropped that token's text and often more (in a byte-level
    vocabulary and with byte fallback alike), and it drops a NUL. So the tokens that are
    parts of a character or hold a NUL (``partial``: their bytes,
    :func:`token_bytes.stream_tokens`) are read here, by Python's UTF-8 decoder, which
    gives U+FFFD for bytes that make no character and keeps what follows; every other token
    is the library's to decode, as before (never given one of these, it decodes the next
    as if they were not there: ``▁and`` is " and")."""

    def __init__(self, stream: oga.TokenizerStream, partial: Mapping[int, bytes]) -> None:
        self._stream = stream
        self._partial = partial
        self._bytes = codecs.getincrementaldecoder("utf-8")("replace")
        self._open = False  # bytes of a character may be held

    def decode(self, token: int) -> str:
        raw = self._partial.get(token)
        if raw is not None:
            self._open = True
            return self._bytes.decode(raw)
        return self.flush() + self._stream.decode(token)

    def flush(self) -> str:
        """U+FFFD for the bytes of a character that did not come ("" when none are held)."""
        if not self._open:
            return ""
        self._open = False
        return self._bytes.decode(b"", final=True)


class GenAIModel:
    """A loaded onnxruntime-genai model and its tokenizer. ``generate`` is thread safe:
    each call has its own generator (and KV cache)."""

    kind = "onnx-genai"

    def __init__(self, directory: pathlib.Path, model: oga.Model, provider: str,
                 prefill_chunk: int = PREFILL_CHUNK_TOKENS) -> None:
        config = json.loads((directory / "genai_config.json").read_text())
        self.directory = directory
        self._model = model
        self._tokenizer = model.tokenizer
        self.provider = provider
        self.prefill_chunk = max(1, prefill_chunk)
        section = config.get("model", {})
        self.context_length = int(section.get("context_length") or config.get("search", {}).get("max_length") or 0)
        self.vocab_size = int(section.get("vocab_size") or 0)
        # Read here, where a load is expected to take time: parsing a tokenizer.json of 10-17 MB
        # holds the GIL for about a second, which in the first request for logprobs stalled the
        # event loop and that request's first token.
        vocabulary = _vocabulary(directory)
        self._pieces: dict[int, Piece] = vocabulary.pieces
        self._bytes_known, self._specials, self._partial = vocabulary.bytes_known, vocabulary.specials, vocabulary.partial

    @classmethod
    def load(cls, directory: pathlib.Path, options: LoadOptions = LoadOptions()) -> GenAIModel:
        try:
            oga.api()
        except ImportError as exc:
            raise errors.ModelLoadError(
                "onnxruntime-genai is not installed: install edgeplane[cpu] (or [gpu]) to serve onnx-genai models") from exc
        except OSError as exc:
            raise errors.ModelLoadError(f"onnxruntime-genai's library cannot be loaded: {exc}") from exc
        try:
            model = oga.Model(directory, options.overlay, providers=options.providers)
        except (oga.OgaError, OSError) as exc:
            raise errors.ModelLoadError(f"onnxruntime-genai could not load the model: {exc}") from exc
        return cls(directory, model, options.provider, options.prefill_chunk)

    # -- prompts ---------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's own chat template applied to ``messages``, ready for the answer."""
        try:
            return self._tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)
        except oga.OgaError as exc:
            raise errors.InvalidInput(f"the model's chat template could not format the messages: {exc}") from exc

    def special_token_in(self, text: str) -> str | None:
        """The first special token's text in ``text`` (``<|im_end|>``), if any. The library
        tokenizes a templated prompt with no way to take part of it as plain text: a
        message's content holding such text would become the token itself (an end of turn,
        a turn of another role), so the server refuses it."""
        found = self._specials.search(text) if self._specials is not None else None
        return found.group() if found else None

    def encode(self, text: str) -> np.ndarray:
        return self._tokenizer.encode(text)

    def token_piece(self, token_id: int) -> Piece:
        """The token as logprobs show it: the library's text of it, or, for one whose text
        it does not decode, what the vocabulary says (its bytes, a special token's text)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            text = self._tokenizer.decode(np.array([token_id], dtype=np.int32))
            # U+FFFD from a vocabulary whose bytes are not read: a part of a character, bytes unknown
            piece = Piece(text, None if "\ufffd" in text and not self._bytes_known else text.encode())
            self._pieces[token_id] = piece
        return piece

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompt: np.ndarray, options: SamplingOptions, emit: Callable[[TokenEvent | Finished], None],
                 cancel: Cancel, window: Window | None = None) -> Finished:
        """Generate on the calling thread, handing each token to ``emit``; ends with one
        :class:`Finished`. Stops between steps once ``cancel`` is set. With a ``window``, the
        thread waits after each token until the consumer is close enough behind it."""
        n_prompt = int(prompt.shape[0])
        search: dict[str, float | int | bool] = {"max_length": n_prompt + options.max_tokens}
        if options.repetition_penalty != 1.0:
            search["repetition_penalty"] = float(options.repetition_penalty)
        if options.temperature > 0:
            search.update(do_sample=True, temperature=float(options.temperature), top_p=float(options.top_p), top_k=self._top_k(options.top_k))
            if options.seed is not None:
                search["random_seed"] = runtime_seed(options.seed)
        else:
            search["do_sample"] = False
        generator = oga.Generator(self._model, search)
        stream = oga.TokenizerStream(self._tokenizer)
        try:
            reason, produced, rest = self._steps(generator, TextStream(stream, self._partial), prompt, options, emit, cancel, window)
        finally:  # the KV cache goes now, not when the collector gets to it
            stream.close()
            generator.close()
        finished = Finished(reason, n_prompt, produced, rest)
        emit(finished)
        return finished

    def _top_k(self, asked: int) -> int:
        """A ``top_k`` of the vocabulary's size or more is every token, as vLLM reads it; the
        library refuses one past the vocabulary, which would fail the request in mid-call."""
        return min(asked, self.vocab_size) if self.vocab_size else asked

    def _steps(self, generator: oga.Generator, stream: TextStream, prompt: np.ndarray, options: SamplingOptions,
               emit: Callable[[TokenEvent | Finished], None], cancel: Cancel, window: Window | None) -> tuple[str, int, str]:
        """Prefill, then one step per token; ``(finish reason, tokens produced, held-back text)``."""
        chunk = self.prefill_chunk
        for start in range(0, int(prompt.shape[0]), chunk):
            if cancel.is_set:
                return "cancelled", 0, ""
            generator.append_tokens(prompt[start:start + chunk])
        stops = StopMatcher(options.stop)
        produced = 0
        reason = "length"
        stopped = False
        while produced < options.max_tokens:
            if cancel.is_set:
                reason = "cancelled"
                break
            if generator.is_done():
                reason = "stop"
                break
            # The logits the next token is drawn from: asked for before the step, which then
            # uses them (asked for after, they would be the following position's).
            logits = generator.logits() if options.logprobs else None
            generator.generate_next_token()
            token = generator.next_token()
            produced += 1
            if token in self._tokenizer.eos_token_ids:
                produced -= 1  # the end-of-sequence token is not part of the answer
                reason = "stop"
                break
            logprob, top = (None, ())
            if logits is not None:
                logprob, top = self._logprobs(logits, token, options.top_logprobs)
            text, stopped = stops.feed(stream.decode(token))
            emit(TokenEvent(text, token, self.token_piece(token) if options.logprobs else None, logprob, top))
            if stopped:
                reason = "stop"
                break
            if window is not None:
                window.wait(produced)
        # A completed stop string leaves nothing held back; the end-of-sequence token, also
        # reason "stop", ends an answer whose held-back text was never part of one (nor
        # were the bytes of a character that did not come: U+FFFD).
        if stopped or reason == "cancelled":
            return reason, produced, stops.flush()
        last, stopped = stops.feed(stream.flush())
        return ("stop" if stopped else reason), produced, last + stops.flush()

    def _logprobs(self, raw: object, token: int, top_n: int) -> tuple[float, tuple[tuple[Piece, float], ...]]:
        logits = np.asarray(raw, dtype=np.float64).reshape(-1)
        shifted = logits - logits.max()
        logp = shifted - np.log(np.exp(shifted).sum())
        top: tuple[tuple[Piece, float], ...] = ()
        if top_n:
            idx = np.argpartition(-logp, min(top_n, logp.size - 1))[:top_n]
            idx = idx[np.argsort(-logp[idx])]
            top = tuple((self.token_piece(int(i)), float(logp[i])) for i in idx)
        return float(logp[token]), top
