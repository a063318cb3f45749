"""OpenAI-compatible request bodies and response objects, free of I/O.

Validation names the offending field the way OpenAI's API does (``param`` of the error
object: ``messages[1].content``, ``max_tokens``) so a client sees what to fix. The agent
keeps its imports small (no pydantic), so the checks are written out here; the shapes
follow the OpenAI API reference for ``/v1/chat/completions`` and ``/v1/completions``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.runtime.genai import SamplingOptions

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


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


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


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


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a number between {lo:g} and {hi:g}, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{i}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
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
        if "content" not in msg or msg["content"] is None:
            raise _bad(f"{param}.content", "is required")
        out.append({"role": str(role), "content": _content(msg["content"], f"{param}.content")})
    return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and len(value) <= MAX_STOPS and all(isinstance(s, str) for s in value):
        return tuple(s for s in value if s)
    raise _bad("stop", f"must be a string or a list of up to {MAX_STOPS} strings")


def parse(raw: bytes, *, chat: bool) -> GenerationRequest:
    """A validated request, or :class:`ApiError` (400) naming the field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required (a string naming the model)")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be a boolean, got {json.dumps(stream)}")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
            raise _bad("stream_options", "must be an object such as {\"include_usage\": true}")
        if not stream:
            raise _bad("stream_options", "is only allowed when stream is true")
        include_usage = bool(so.get("include_usage", False))
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise _bad("n", "only n=1 is supported")
    if chat:
        messages = _messages(body.get("messages"))
        prompt = ""
        max_tokens = _integer(body, "max_completion_tokens", 1, 1 << 30)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1, 1 << 30)
        want_logprobs = body.get("logprobs", False)
        if want_logprobs is None:
            want_logprobs = False
        if not isinstance(want_logprobs, bool):
            raise _bad("logprobs", f"must be a boolean, got {json.dumps(want_logprobs)}")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if top and not want_logprobs:
            raise _bad("top_logprobs", "needs logprobs: true")
    else:
        messages = ()
        prompt = _prompt(body.get("prompt"))
        max_tokens = _integer(body, "max_tokens", 1, 1 << 30)
        if max_tokens is None:
            max_tokens = 16  # the OpenAI default for completions
        lp = _integer(body, "logprobs", 0, 5)
        want_logprobs, top = lp is not None, lp or 0
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise _bad("echo", f"must be a boolean, got {json.dumps(echo)}")
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    options = SamplingOptions(
        max_tokens=max_tokens or 0,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=seed,
        stop=_stop(body.get("stop")),
        logprobs=bool(want_logprobs),
        top_logprobs=top,
    )
    return GenerationRequest(model, chat, messages, prompt, stream, include_usage, max_tokens, options, echo and not chat)


def _prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str) for v in value):
        raise _bad("prompt", "only one prompt per request is supported")
    raise _bad("prompt", "is required: a string")


def context_error(limit: int, prompt_tokens: int, max_tokens: int | None) -> ApiError:
    asked = prompt_tokens + (max_tokens or 0)
    detail = f"{prompt_tokens} in the prompt" + (f", {max_tokens} in the completion" if max_tokens else "")
    return ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested {asked} tokens ({detail}). "
                         "Please reduce the length of the prompt or max_tokens.",
                    param="messages" if max_tokens is None else "max_tokens", code="context_length_exceeded")


# --- responses ------------------------------------------------------------------------------


def _chat_logprobs(tokens: Sequence[Any]) -> dict[str, Any]:
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top]}
        for t in tokens]}


def _completion_logprobs(tokens: Sequence[Any], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class Shaper:
    """Builds the objects of one response (whole, or as stream chunks)."""

    def __init__(self, request: GenerationRequest, request_id: str, created: int | None = None) -> None:
        self.request = request
        self.id = request_id
        self.created = int(time.time()) if created is None else created
        self.object = "chat.completion" if request.chat else "text_completion"
        self._template: tuple[bytes, bytes] | None = None

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.request.model}

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
