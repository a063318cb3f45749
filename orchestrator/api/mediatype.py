"""Which request bodies the control API reads as manifests or a scenario: YAML or JSON text
in UTF-8, as sent. A body declared as something else (a gzip file, an HTML page, a text in
another charset) is refused with 415 before it is read, where it was read as manifests and
refused for what it held (a gzip body as "not UTF-8"), or worse, applied."""

from __future__ import annotations

import email.message

#: The media types read as manifests, besides any ``+json`` type.
YAML = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
JSON = ("application/json",)
#: What the CLI (no Content-Type), ``curl --data-binary`` without ``-H``
#: (``application/x-www-form-urlencoded``) and a plain text editor's upload send.
PLAIN = ("text/plain", "application/x-www-form-urlencoded")
ACCEPTED = (*YAML, *JSON, "application/*+json", *PLAIN)

#: The ``Accept``-style hint the refusals end with.
HINT = "send Content-Type: application/yaml or application/json (charset=utf-8, no Content-Encoding)"


class Unsupported(Exception):
    """A body the route does not read (answered 415, with the accepted types)."""


def check(content_type: str | None, content_encoding: str | None) -> None:
    """:class:`Unsupported` when a body with these headers is not to be read."""
    reason = refusal(content_type, content_encoding)
    if reason is not None:
        raise Unsupported(reason)


def refusal(content_type: str | None, content_encoding: str | None) -> str | None:
    """Why a body with these headers is not read (answered 415), or None to read it."""
    encoding = (content_encoding or "").strip().lower()
    if encoding not in ("", "identity"):
        return f"Content-Encoding {content_encoding[:40]!r} is not accepted: the body must be sent as is; {HINT}"
    if content_type is None or not content_type.strip():
        return None
    header = email.message.Message()
    header["content-type"] = content_type
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared != header.get_content_type():  # not type/subtype: read as text/plain by the parser
        return f"Content-Type {content_type[:80]!r} is not a media type; accepted: {', '.join(ACCEPTED)}; {HINT}"
    if declared not in (*YAML, *JSON, *PLAIN) and not declared.endswith("+json"):
        return f"Content-Type {declared[:80]!r} is not accepted: manifests are YAML or JSON (accepted: {', '.join(ACCEPTED)}); {HINT}"
    charset = header.get_param("charset")
    if charset is not None and str(charset).strip().lower() not in ("utf-8", "utf8", "us-ascii", "ascii"):
        return f"charset {str(charset)[:40]!r} is not accepted: bodies are UTF-8; {HINT}"
    return None
