"""The reason a caller gives for a change (``--reason``), as it travels in ``X-Edgeplane-Reason``.

Why: the reason lands in the event log, and operators write it in their own language
("maintenance électrique"), while an HTTP header holds ASCII and servers read its bytes as
latin-1. So the CLI sends a reason that is not printable ASCII percent-encoded as UTF-8 behind
RFC 8187's ``UTF-8''`` prefix, and the control plane decodes that; a plain ASCII reason goes
as it is, and is read as it is (a ``%`` in it included), as curl and older CLIs send it; the
raw UTF-8 bytes curl sends for ``-H 'X-Edgeplane-Reason: réparé'`` are read as UTF-8.

A reason is one line of the log: a line break or other control character in it becomes a
space, so no reason can print as an event of its own.
"""

from __future__ import annotations

import unicodedata
import urllib.parse

HEADER = "x-edgeplane-reason"
MAX_CHARS = 500  # the event log keeps this much of a reason
_PREFIX = "UTF-8''"
#: RFC 8187's attr-char beyond letters, digits and "_.-~" (which quote keeps anyway)
_ATTR_CHARS = "!#$&+^`|"


def cleaned(reason: str) -> str:
    """``reason`` as one line: each control character a space, no blanks at its ends."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in reason).strip()


def to_header(reason: str) -> str:
    """The header value that carries ``reason``: itself when it is printable ASCII (and does
    not start as an encoded one does), else its UTF-8 percent-encoded behind ``UTF-8''``."""
    reason = cleaned(reason)
    if all(" " <= c <= "~" for c in reason) and not reason[:len(_PREFIX)].upper() == _PREFIX:
        return reason
    return _PREFIX + urllib.parse.quote(reason, safe=_ATTR_CHARS, encoding="utf-8")


def from_header(value: str | None, default: str) -> str:
    """The reason a header value carries (as the server read it: its bytes as latin-1), at most
    :data:`MAX_CHARS` characters of one line; ``default`` when there is none."""
    if not value:
        return default
    if value[:len(_PREFIX)].upper() == _PREFIX:
        reason = urllib.parse.unquote(value[len(_PREFIX):], encoding="utf-8", errors="replace")
    else:
        raw = value.encode("latin-1", errors="replace")
        try:
            reason = raw.decode("utf-8")  # curl and most clients send text as UTF-8
        except UnicodeDecodeError:
            reason = value  # latin-1 indeed
    return cleaned(reason)[:MAX_CHARS] or default
