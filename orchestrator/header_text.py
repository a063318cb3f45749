"""Text in an operator's own script as it travels in an HTTP header.

Why: a reason ("maintenance électrique") or a region ("Île-de-France", "北京") is written in
any script, while an HTTP header holds ASCII and servers read its bytes as latin-1. So the
CLI and the Python client send text that is not printable ASCII percent-encoded as UTF-8
behind RFC 8187's ``UTF-8''`` prefix, and the servers decode that; plain ASCII goes as it is
and is read as it is (a ``%`` in it included), as curl and older clients send it; the raw
UTF-8 bytes curl sends for ``-H 'X-Edgeplane-Region: Île-de-France'`` are read as UTF-8.
"""

from __future__ import annotations

import unicodedata
import urllib.parse

_PREFIX = "UTF-8''"
#: RFC 8187's attr-char beyond letters, digits and "_.-~" (which quote keeps anyway)
_ATTR_CHARS = "!#$&+^`|"


#: Why a value that must travel as it is (a residency) is refused, and one that may be in
#: any script (a region) but is not one line: said alike by the CLI and the Python client.
NOT_ASCII = "only printable ASCII travels in an HTTP header (no accents, no line breaks)"
NOT_ONE_LINE = "one line of text, without a line break or other control character"


def printable_ascii(text: str) -> bool:
    """Whether ``text`` travels in a header as it is (no accent, no line break)."""
    return all(" " <= c <= "~" for c in text)


def one_line(text: str) -> bool:
    """Whether ``text`` holds no line break or other control character (C0, C1, U+2028, U+2029)."""
    return not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def encoded(text: str) -> str:
    """The header value that carries ``text``: itself when it is printable ASCII (and does
    not start as an encoded one does), else its UTF-8 percent-encoded behind ``UTF-8''``."""
    if printable_ascii(text) and not text[:len(_PREFIX)].upper() == _PREFIX:
        return text
    return _PREFIX + urllib.parse.quote(text, safe=_ATTR_CHARS, encoding="utf-8")


def decoded(value: str) -> str:
    """The text a header value carries, as the server read it (its bytes as latin-1)."""
    if value[:len(_PREFIX)].upper() == _PREFIX:
        return urllib.parse.unquote(value[len(_PREFIX):], encoding="utf-8", errors="replace")
    try:
        return value.encode("latin-1").decode("utf-8")  # curl and most clients send text as UTF-8
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value  # latin-1 indeed
