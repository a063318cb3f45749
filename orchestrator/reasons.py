"""The reason a caller gives for a change (``--reason``), as it travels in ``X-Edgeplane-Reason``.

Why: the reason lands in the event log, and operators write it in their own language
("maintenance électrique"): it travels as :mod:`orchestrator.header_text` says.

A reason is one line of the log: a line break or other control character in it becomes a
space, so no reason can print as an event of its own.
"""

from __future__ import annotations

import unicodedata

from orchestrator import header_text

HEADER = "x-edgeplane-reason"
MAX_CHARS = 500  # the event log keeps this much of a reason


def cleaned(reason: str) -> str:
    """``reason`` as one line: each control character a space, no blanks at its ends."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in reason).strip()


def to_header(reason: str) -> str:
    """The header value that carries ``reason`` (:func:`header_text.encoded`)."""
    return header_text.encoded(cleaned(reason))


def from_header(value: str | None, default: str) -> str:
    """The reason a header value carries (as the server read it: its bytes as latin-1), at most
    :data:`MAX_CHARS` characters of one line; ``default`` when there is none."""
    if not value:
        return default
    return cleaned(header_text.decoded(value))[:MAX_CHARS] or default
