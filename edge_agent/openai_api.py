"""OpenAI-compatible request bodies and response objects, free of I/O.

Validation names the offending field the way OpenAI's API does (``param`` of the error
object: ``messages[1].content``, ``max_tokens``) so a client sees what to fix. The agent
keeps its imports small (no pydantic), so the checks are written out here; the shapes
follow the OpenAI API reference for ``/v1/chat/completions`` and ``/v1/completions``.

As OpenAI's API does, a field that is not one of the route's parameters is refused
(``unknown_parameter``) rather than ignored. A parameter of OpenAI's that these models do
not act on (``tools``, ``logit_bias``, penalties, ``response_format``...) is taken only at
the value that asks for nothing (absent, null, or its neutral value): any other value is
refused (``unsupported_parameter``), so an answer never quietly leaves out what was asked.
Parameters about the caller (``user``, ``metadata``...) are checked for their type (and
``metadata`` for OpenAI's bounds) and otherwise ignored.
"""

from __future__ import annotations

import functools
import json
import json.decoder
import json.scanner
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent import refusals
from edge_agent.runtime.genai import Piece, SamplingOptions

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
MAX_TOKENS = 1 << 30
MAX_REPETITION_PENALTY = 10.0
MAX_METADATA_PAIRS = 16  # as OpenAI's API bounds metadata
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
#: No object these routes take has more keys than a route has parameters (and ``metadata``
#: 16): a body read on a worker thread with a wider one is refused before it is built.
MAX_OBJECT_KEYS = 1024
#: A body read on a worker thread with more values than this is refused as it is read: a
#: chat of 60,000 messages holds about 200,000 (a message, its role, its content), more than
#: the context of a model these agents serve has room for; freeing this many takes ~10 ms.
MAX_BODY_VALUES = 1 << 18
#: The least a chat template writes around each message besides its role and content
#: (ChatML's "<|im_start|>", "\n" and "<|im_end|>\n" are 24 characters).
MESSAGE_CHARS = 16
#: The parameters each route acts on.
#: ``top_k`` and ``repetition_penalty`` are vLLM's: the gateway may send one body to an edge
#: agent or to a vLLM replica in a data centre, and both act on them.
_SAMPLING = frozenset({"temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop"})
_CHAT_USED = frozenset({"model", "messages", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens", "logprobs",
                        "top_logprobs"}) | _SAMPLING
_COMPLETION_USED = frozenset({"model", "prompt", "stream", "stream_options", "n", "max_tokens", "logprobs", "echo"}) | _SAMPLING
#: OpenAI's parameters that these models do not act on, with the values that ask for
#: nothing (null always does). Any other value is refused.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
    "tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": (),
    "best_of": (1,), "suffix": ("",),
}
#: OpenAI's parameters about the caller or the service, with no bearing on the answer:
#: checked for their type, then ignored.
_IGNORED: dict[str, type] = {"user": str, "metadata": dict, "store": bool, "service_tier": str, "safety_identifier": str,
                             "prompt_cache_key": str, "parallel_tool_calls": bool}
_COMPLETION_NEUTRAL = ("frequency_penalty", "presence_penalty", "logit_bias", "best_of", "suffix")
_CHAT_NEUTRAL = tuple(name for name in _NEUTRAL if name not in ("best_of", "suffix"))
CHAT_PARAMETERS = _CHAT_USED | set(_CHAT_NEUTRAL) | set(_IGNORED)
COMPLETION_PARAMETERS = _COMPLETION_USED | set(_COMPLETION_NEUTRAL) | {"user"}
STREAM_OPTIONS = ("include_usage", "include_obfuscation")
#: A message's parts of a tool conversation, which these models are not shown: refused
#: unless empty, as ``tools`` is.
_TOOL_FIELDS = ("tool_calls", "function_call", "tool_call_id")


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


#: OpenAI's error object (one definition, shared with the HTTP server's own refusals).
error_body = refusals.openai_error_body


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _show(value: Any) -> str:
    """``value`` as JSON, cut short: error messages quote what was sent, never all of it."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _name(key: str) -> str:
    """A field name the caller made up, as an error names it: as sent when it is one short
    line of printable text, else quoted as JSON (an error message is one line)."""
    return key if key.isprintable() and len(key) <= 40 else _show(key)


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    chat: bool
    messages: tuple[dict[str, str], ...]  # chat
    prompt: str  # completions
    stream: bool
    include_usage: bool
    max_tokens: int | None
    options: SamplingOptions  # max_tokens filled in once the prompt length is known
    echo: bool = False
    max_tokens_param: str | None = None  # the field the caller bounded the answer with, if any


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    # compared, never converted: an integer of 400 digits is out of range, not an overflow; NaN is in no range
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _bad(name, f"must be a number between {lo:g} and {hi:g}, got {_show(value)}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo} and {hi}, got {_show(value)}")
    return value


def _text(value: str, param: str) -> str:
    """``value``, which must be Unicode text: JSON's escapes can carry half a surrogate
    pair (``"\\ud800"``), which no tokenizer takes."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise _bad(param, f"is not valid Unicode: a lone surrogate {_show(value[exc.start])} at character {exc.start}") from None
    return value


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral  # true is not 1
    return bool(value == neutral)


def _check_parameters(body: Mapping[str, Any], chat: bool) -> None:
    """Refuse what the route does not take (see the module docstring)."""
    unknown = [_name(k) for k in sorted(set(body) - (CHAT_PARAMETERS if chat else COMPLETION_PARAMETERS))]
    if unknown:
        many = "s" if len(unknown) > 1 else ""
        raise ApiError(400, f"Unrecognized request argument{many} supplied: {', '.join(unknown)}", param=unknown[0],
                       code="unknown_parameter")
    for name in _CHAT_NEUTRAL if chat else _COMPLETION_NEUTRAL:
        value = body.get(name)
        if value is not None and not any(_same(value, n) for n in _NEUTRAL[name]):
            choices = " or ".join(json.dumps(n) for n in _NEUTRAL[name])
            raise _bad(name, "is not supported by this model server; leave it out" + (f" or send {choices}" if choices else ""),
                       code="unsupported_parameter")
    for name, kind in _IGNORED.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise _bad(name, f"must be {'an object' if kind is dict else 'a boolean' if kind is bool else 'a string'}, "
                             f"got {_show(value)}")
    if body.get("metadata"):
        _check_metadata(body["metadata"])


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    """OpenAI's bounds on ``metadata``: ignored here, but not unbounded."""
    if len(metadata) > MAX_METADATA_PAIRS:
        raise _bad("metadata", f"may hold at most {MAX_METADATA_PAIRS} key-value pairs, got {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise _bad("metadata", f"keys are at most {MAX_METADATA_KEY} characters long, got one of {len(key)}")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise _bad("metadata", f"values are strings of at most {MAX_METADATA_VALUE} characters, got {_show(value)} "
                                   f"for {_name(key)}")


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return _text(value, param)
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{i}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(_text(part["text"], f"{param}[{i}].text"))
        return "".join(parts)
    raise _bad(param, f"must be a string or a list of text parts, got {type(value).__name__}")


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(param, f"must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"{param}.role", f"must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
        for field in _TOOL_FIELDS:  # the templates are given role and content only: the call would be left out
            if msg.get(field):
                raise _bad(f"{param}.{field}", "is not supported by this model server (it does not call tools); "
                                               "leave it out", code="unsupported_parameter")
        if "content" not in msg or msg["content"] is None:
            raise _bad(f"{param}.content", "is required")
        if msg.get("name") is not None and not isinstance(msg["name"], str):
            raise _bad(f"{param}.name", f"must be a string, got {_show(msg['name'])}")
        out.append({"role": str(role), "content": _content(msg["content"], f"{param}.content")})
    return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_text(value, "stop"),) if value else ()
    if isinstance(value, list) and len(value) <= MAX_STOPS and all(isinstance(s, str) for s in value):
        return tuple(_text(s, f"stop[{i}]") for i, s in enumerate(value) if s)
    raise _bad("stop", f"must be a string or a list of up to {MAX_STOPS} strings")


class _TooLarge(ValueError):
    """A body past :data:`MAX_OBJECT_KEYS` or :data:`MAX_BODY_VALUES`, found while it is read."""


def _interruptible_decoder() -> json.JSONDecoder:
    """A JSON decoder that lets other threads run while it reads, and stops at a body wider
    than any the routes take. json's C scanner holds the GIL for a whole body (seconds for
    one of millions of values, on a worker thread too), its pure-Python one gives it up
    between values. Long strings are still read by a regular expression at once: a large
    prompt costs tens of milliseconds more, not seconds.

    What it cannot give up is the GIL inside one C call: an object's pairs become a dict in
    one (1-2 s for 3 million keys, the event loop stalled as long whichever thread makes it),
    and a tree is freed in one. So objects are refused past :data:`MAX_OBJECT_KEYS` keys
    before they are built, and a body past :data:`MAX_BODY_VALUES` values as it is read.
    One decoder per body: it counts that body's values."""
    decoder = json.JSONDecoder()
    decoder.parse_string = json.decoder.py_scanstring  # type: ignore[attr-defined]
    values = 0

    def counted(scan_once: Any, string: str, idx: int) -> Any:
        nonlocal values
        values += 1
        if values > MAX_BODY_VALUES:
            raise _TooLarge(f"it holds more than {MAX_BODY_VALUES} values")
        return scan_once(string, idx)

    def parse_object(s_and_end: Any, strict: bool, scan_once: Any, *hooks: Any) -> Any:
        keys = 0

        def value(string: str, idx: int) -> Any:
            nonlocal keys
            keys += 1
            if keys > MAX_OBJECT_KEYS:
                raise _TooLarge(f"an object holds more than {MAX_OBJECT_KEYS} keys")
            return counted(scan_once, string, idx)

        return json.decoder.JSONObject(s_and_end, strict, value, *hooks)  # type: ignore[attr-defined]

    def parse_array(s_and_end: Any, scan_once: Any) -> Any:
        return json.decoder.JSONArray(s_and_end, functools.partial(counted, scan_once))  # type: ignore[attr-defined]

    decoder.parse_object, decoder.parse_array = parse_object, parse_array  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    return decoder


def parse(raw: bytes, *, chat: bool, interruptible: bool = False) -> GenerationRequest:
    """A validated request, or :class:`ApiError` (400) naming the field. ``interruptible``:
    read on a worker thread, letting other threads run meanwhile (see :func:`_interruptible_decoder`)."""
    try:
        if interruptible:
            body = _interruptible_decoder().decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
        else:
            body = json.loads(raw)
    except _TooLarge as exc:
        raise ApiError(400, f"the request body is wider than any these routes take: {exc}") from None
    except ValueError as exc:  # not UTF-8 either
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None or model == "":
        raise _bad("model", "is required (a string naming the model)")
    if not isinstance(model, str):
        raise _bad("model", f"must be a string naming the model, got {_show(model)}")
    _check_parameters(body, chat)
    stream = _flag(body, "stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("stream_options", f"must be an object such as {{\"include_usage\": true}}, got {_show(so)}")
        for key, value in so.items():
            if key not in STREAM_OPTIONS:
                raise ApiError(400, f"Unrecognized request argument supplied: stream_options.{_name(key)}", param=f"stream_options.{_name(key)}",
                               code="unknown_parameter")
            if value is not None and not isinstance(value, bool):
                raise _bad(f"stream_options.{key}", f"must be a boolean, got {_show(value)}")
        if not stream:
            raise _bad("stream_options", "is only allowed when stream is true")
        include_usage = so.get("include_usage") is True
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise _bad("n", "only n=1 is supported")
    max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS)
    max_tokens_param = None if max_tokens is None else "max_tokens"
    if chat:
        messages = _messages(body.get("messages"))
        prompt = ""
        most = _integer(body, "max_completion_tokens", 1, MAX_TOKENS)
        if most is not None:  # the newer name wins
            max_tokens, max_tokens_param = most, "max_completion_tokens"
        want_logprobs = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if top and not want_logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")
        echo = False
    else:
        messages = ()
        prompt = _prompt(body.get("prompt"))
        if max_tokens is None:
            max_tokens = 16  # the OpenAI default for completions
        lp = _integer(body, "logprobs", 0, 5)
        want_logprobs, top = lp is not None, lp or 0
        echo = _flag(body, "echo")
        if echo and want_logprobs:
            # OpenAI's answer then holds the prompt's tokens' logprobs too; this server computes
            # only the completion's, and an answer must not quietly leave the others out
            raise _bad("echo", "with logprobs asks for the prompt's token logprobs too, which this model server does not compute; "
                               "send echo or logprobs, not both", code="unsupported_parameter")
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    options = SamplingOptions(
        max_tokens=max_tokens or 0,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=max(0, _integer(body, "top_k", -1, MAX_TOKENS) or 0),  # -1, as vLLM writes it, or 0: every token
        repetition_penalty=_repetition_penalty(body),
        seed=seed,
        stop=_stop(body.get("stop")),
        logprobs=want_logprobs,
        top_logprobs=top,
    )
    return GenerationRequest(model, chat, messages, prompt, stream, include_usage, max_tokens, options, echo, max_tokens_param)


def _repetition_penalty(body: Mapping[str, Any]) -> float:
    value = _number(body, "repetition_penalty", 1.0, 0.0, MAX_REPETITION_PENALTY)
    if value == 0:  # it divides the likelihood of tokens seen
        raise _bad("repetition_penalty", "must be more than 0 (1 changes nothing)")
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"must be a boolean, got {_show(value)}")
    return value


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return _text(value, "prompt")
    if value is None:
        raise _bad("prompt", "is required: a string")
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str) for v in value):
        raise _bad("prompt", "only one prompt per request is supported")
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in value):
        raise _bad("prompt", "token arrays are not supported: send the prompt as a string")
    raise _bad("prompt", f"must be a string, got {_show(value)}")


def context_error(request: GenerationRequest, limit: int, prompt_tokens: int) -> ApiError:
    """The prompt, or the prompt and the answer asked for, do not fit the context. The
    param is the field to change: the answer's bound when the prompt alone fits and the
    caller set one, the prompt otherwise."""
    max_tokens = request.max_tokens
    asked = prompt_tokens + (max_tokens or 0)
    detail = f"{prompt_tokens} in the prompt" + (f", {max_tokens} in the completion" if max_tokens else "")
    param = request.max_tokens_param if prompt_tokens < limit and request.max_tokens_param else _prompt_param(request)
    return ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested {asked} tokens ({detail}). "
                         "Please reduce the length of the prompt or max_tokens.", param=param, code="context_length_exceeded")


def prompt_too_long(request: GenerationRequest, limit: int, chars: int) -> ApiError:
    """A prompt of ``chars`` characters, refused before it is tokenized: more than ``limit``
    tokens of any vocabulary (see ``MAX_TOKEN_CHARS`` in ``edge_agent.generation``)."""
    return ApiError(400, f"This model's maximum context length is {limit} tokens. However, the prompt is {chars} characters long, "
                         f"more than {limit} tokens can hold. Please reduce the length of the prompt.",
                    param=_prompt_param(request), code="context_length_exceeded")


def _prompt_param(request: GenerationRequest) -> str:
    return "messages" if request.chat else "prompt"


def too_many_messages(request: GenerationRequest, limit: int) -> ApiError:
    """More messages than the context has tokens: a chat template writes at least one token
    per message (its role's marker), so these cannot fit, however short they are."""
    return ApiError(400, f"This model's maximum context length is {limit} tokens. However, the request has "
                         f"{len(request.messages)} messages, each at least one token. Please reduce the number of messages.",
                    param="messages", code="context_length_exceeded")


def prompt_chars(request: GenerationRequest) -> int:
    """The prompt's length in characters, as the work of formatting and tokenizing it goes:
    a chat message counts what its template writes around it too, so that many empty
    messages are no free prompt."""
    if not request.chat:
        return len(request.prompt)
    return sum(MESSAGE_CHARS + len(m["role"]) + len(m["content"]) for m in request.messages)


def prompt_utf8_bytes(request: GenerationRequest) -> int:
    """At most the prompt's length in UTF-8, counted as :func:`prompt_chars` is: a text
    that is not ASCII (known without reading it) at 4 bytes a character."""
    def size(text: str) -> int:
        return len(text) if text.isascii() else 4 * len(text)

    if not request.chat:
        return size(request.prompt)
    return sum(MESSAGE_CHARS + size(m["role"]) + size(m["content"]) for m in request.messages)


# --- responses ------------------------------------------------------------------------------


def _chat_logprobs(tokens: Sequence[Any]) -> dict[str, Any]:
    return {"content": [
        {"token": t.token.text, "logprob": t.logprob, "bytes": _bytes(t.token),
         "top_logprobs": [{"token": p.text, "logprob": lp, "bytes": _bytes(p)} for p, lp in t.top]}
        for t in tokens]}


def _bytes(piece: Piece) -> list[int] | None:
    return None if piece.raw is None else list(piece.raw)


def _completion_logprobs(tokens: Sequence[Any], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += characters(t.token)
    return {"tokens": [t.token.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{p.text: lp for p, lp in t.top} for t in tokens], "text_offset": offsets}


def characters(piece: Piece) -> int:
    """How many characters of the text begin in this token: a token that is part of a
    character counts for one when it holds its first byte."""
    if piece.raw is None:
        return len(piece.text)
    return sum(1 for b in piece.raw if b & 0xC0 != 0x80)  # not a UTF-8 continuation byte


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class Shaper:
    """Builds the objects of one response (whole, or as stream chunks)."""

    def __init__(self, request: GenerationRequest, request_id: str, created: int | None = None, version: str = "") -> None:
        self.request = request
        self.id = request_id
        # OpenAI's word for the backend that answered: the served package's version, so a
        # caller tells answers apart across a rollout (the v2 protocol's model_version)
        self.fingerprint = f"fp_{version}" if version else None
        self.created = int(time.time()) if created is None else created
        self.object = "chat.completion" if request.chat else "text_completion"
        self._template: tuple[bytes, bytes] | None = None

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.request.model,
                "system_fingerprint": self.fingerprint}

    def whole(self, text: str, tokens: Sequence[Any], reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        out = self._head(self.object)
        lp = self.request.options.logprobs
        if self.request.chat:
            out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                               "logprobs": _chat_logprobs(tokens) if lp else None, "finish_reason": finish_reason(reason)}]
        else:
            prefix = self.request.prompt if self.request.echo else ""
            out["choices"] = [{"index": 0, "text": prefix + text, "logprobs": _completion_logprobs(tokens, len(prefix)) if lp else None,
                               "finish_reason": finish_reason(reason)}]
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out

    def token_event(self, text: str) -> bytes:
        """The SSE event of one token without logprobs: the same bytes as ``sse(chunk(text))``,
        made from a template (only the text is encoded per token)."""
        template = self._template
        if template is None:
            marker = "\x00"
            whole = sse(self.chunk(marker)).decode()
            at = whole.index(json.dumps(marker))
            template = self._template = (whole[:at].encode(), whole[at + len(json.dumps(marker)):].encode())
        return template[0] + json.dumps(text).encode() + template[1]

    def chunk(self, text: str, tokens: Sequence[Any] = (), *, first: bool = False, reason: str | None = None,
              offset: int = 0) -> dict[str, Any]:
        lp = self.request.options.logprobs and bool(tokens)
        if self.request.chat:
            out = self._head("chat.completion.chunk")
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text or not reason else {})
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": _chat_logprobs(tokens) if lp else None,
                               "finish_reason": finish_reason(reason) if reason else None}]
        else:
            out = self._head("text_completion")
            out["choices"] = [{"index": 0, "text": text, "logprobs": _completion_logprobs(tokens, offset) if lp else None,
                               "finish_reason": finish_reason(reason) if reason else None}]
        if self.request.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.request.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out


def sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(err: ApiError) -> bytes:
    return b"data: " + err.body() + b"\n\n"


def models_list(names: Sequence[tuple[str, str]], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": owner} for n, owner in names]}
