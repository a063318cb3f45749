"""The errors the HTTP server answers itself, in the error shape of the API that was asked.

The agent speaks two APIs on one port, each with its own error object: the Open Inference
Protocol's ``{"error": "..."}`` (every path but ``/v1``) and OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (``/v1`` and below), the only one
OpenAI's SDKs read (``openai.APIStatusError.body``, ``.code``, ``.type``). Routes shape their
own errors. The server answers some requests before any route sees them (a head or a body
too large, a malformed request, one not received in time) and those whose route failed:
they are shaped here, by the request target when it was received far enough to be known,
the v2 way otherwise.

Only refusals come here, so a well-formed request never pays for a second look at its
target. This module stays light (no onnxruntime, no generation code): the server imports
it whatever the agent serves.
"""

from __future__ import annotations

import urllib.parse

import httptools

from edgeplane_proto import oip, openai_error

#: The root of the OpenAI-compatible routes (an SDK's ``base_url`` ends with it).
OPENAI_ROOT = "/v1"
#: The routes that take a body: the only ones whose compressed body is worth inflating.
GENERATE_PATHS = frozenset({f"{OPENAI_ROOT}/chat/completions", f"{OPENAI_ROOT}/completions"})


def speaks_openai(path: str) -> bool:
    """Whether ``path`` (percent-decoded, without its query) is answered the OpenAI way."""
    return path.startswith(OPENAI_ROOT) and (len(path) == len(OPENAI_ROOT) or path[len(OPENAI_ROOT)] == "/")


#: OpenAI's error object (the gateways' too).
openai_error_body = openai_error.body


def target_path(target: bytes | bytearray) -> str | None:
    """The percent-decoded path of a request target, as much of it as was received (origin
    form ``/v1/...`` or absolute form ``http://host/v1/...``); None when there is none."""
    raw = bytes(target)
    if not raw.startswith(b"/"):
        try:
            raw = httptools.parse_url(raw).path or b""
        except httptools.HttpParserInvalidURLError:
            return None
    raw = raw.partition(b"?")[0].partition(b"#")[0]
    return urllib.parse.unquote(raw.decode("latin-1")) if raw else None


def error_body(status: int, message: str, code: str, path: str | None) -> bytes:
    """The body of an error answered by the server to a request for ``path`` (None: not
    received far enough to tell). ``code`` is OpenAI's machine-readable ``code``."""
    if path is not None and speaks_openai(path):
        return openai_error_body(message, "server_error" if status >= 500 else "invalid_request_error", None, code)
    return oip.error_body(message)
