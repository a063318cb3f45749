"""The text of a file or a request body given as bytes: UTF-8, or what its byte-order mark says.

Why: Windows PowerShell 5 writes every ``>`` redirect and ``Out-File`` as UTF-16 with a
byte-order mark (``edgeplane get site x -o yaml > site.yaml``), Notepad may write UTF-8 with
one, and YAML 1.1 defines UTF-16 and UTF-32 files that start with their mark; kubectl reads
them too. Without a mark text is UTF-8; the mark is no part of the text.
"""

from __future__ import annotations

import codecs

#: Marks and the codec that reads the text behind them; UTF-32-LE's mark starts as UTF-16-LE's does.
_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


class NotText(ValueError):
    """Bytes that are not text in the encoding they are in (``encoding``, as people name it),
    from ``start`` on (an offset in the bytes given)."""

    def __init__(self, encoding: str, start: int) -> None:
        super().__init__(f"not {encoding} text (byte {start})")
        self.encoding, self.start = encoding, start


def decoded(raw: bytes) -> str:
    """The text of ``raw``, without its byte-order mark; :class:`NotText` when it is not text."""
    mark, codec, name = next((m for m in _MARKS if raw.startswith(m[0])), (b"", "utf-8", "UTF-8"))
    try:
        return raw[len(mark):].decode(codec)
    except UnicodeDecodeError as exc:
        raise NotText(name, len(mark) + exc.start) from None
