"""The text of a file or a request body given as bytes: UTF-8, or what its byte-order mark says.

Why: Windows PowerShell 5 writes every ``>`` redirect and ``Out-File`` as UTF-16 with a
byte-order mark (``edgeplane get site x -o yaml > site.yaml``), Notepad may write UTF-8 with
one, and YAML 1.1 defines UTF-16 and UTF-32 files that start with their mark; kubectl reads
them too. Without a mark text is UTF-8; the mark is no part of the text. UTF-16 without a
mark (what some editors write as "Unicode") is refused as not UTF-8, saying it looks like
UTF-16, where its first bytes show its shape: mostly ASCII or Latin text, a NUL in every
other byte; or, for bytes UTF-8 cannot read, text mostly in another script (a file that
starts with a Chinese comment), whose first bytes read as UTF-16 of assigned characters and
hold a control byte that no text in an 8-bit or multibyte encoding holds (latin-1, cp1252,
GBK, Shift-JIS, EUC-KR, Big5): its NULs, or the low byte of 、。，「 (U+3001, U+3002,
U+FF0C, U+300C). Text with neither (no ASCII and no such punctuation in its first 256
characters) is refused as not UTF-8 alone.
"""

from __future__ import annotations

import codecs
import unicodedata

#: Marks and the codec that reads the text behind them; UTF-32-LE's mark starts as UTF-16-LE's does.
_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


#: How many of the first bytes show whether text without a mark is UTF-16.
_SHAPE_BYTES = 512


class NotText(ValueError):
    """Bytes that are not text in the encoding they are in (``encoding``, as people name it),
    from ``start`` on (an offset in the bytes given); ``hint``: what they seem to be, if known."""

    def __init__(self, encoding: str, start: int, hint: str = "") -> None:
        super().__init__(f"not {encoding} text (byte {start})" + (f": it {hint}" if hint else ""))
        self.encoding, self.start, self.hint = encoding, start, hint


def decoded(raw: bytes) -> str:
    """The text of ``raw``, without its byte-order mark; :class:`NotText` when it is not text."""
    mark, codec, name = next((m for m in _MARKS if raw.startswith(m[0])), (b"", "utf-8", "UTF-8"))
    if not mark and _utf16_shaped(raw):  # its ASCII would read as UTF-8, a NUL every other byte
        raise NotText("UTF-8", raw.index(b"\0"), "looks like UTF-16 without a byte-order mark: save it as UTF-8")
    try:
        return raw[len(mark):].decode(codec)
    except UnicodeDecodeError as exc:
        hint = "looks like UTF-16 without a byte-order mark: save it as UTF-8" if not mark and _utf16_text(raw) else ""
        raise NotText(name, len(mark) + exc.start, hint) from None


def _utf16_shaped(raw: bytes) -> bool:
    """Whether the first bytes of ``raw`` are UTF-16 of mostly ASCII or Latin text (a YAML or
    JSON file's keys and punctuation): a NUL in at least half the bytes of one parity (the high
    bytes, first in big-endian, second in little-endian) and none in the other."""
    head = raw[:min(len(raw), _SHAPE_BYTES) & ~1]  # whole code units
    even, odd = head[0::2].count(0), head[1::2].count(0)
    units = len(head) // 2
    return units >= 2 and min(even, odd) == 0 and 2 * max(even, odd) >= units


#: Bytes that text in an 8-bit or multibyte encoding never holds: C0 controls but tab, LF and CR.
_CONTROL = frozenset(range(0x20)) - {0x09, 0x0A, 0x0D}
#: Characters that are not text: controls, unassigned, private use, a surrogate alone.
_NOT_TEXT = frozenset({"Cc", "Cn", "Co", "Cs"})


def _utf16_text(raw: bytes) -> bool:
    """Whether the first bytes of ``raw``, which UTF-8 cannot read, are UTF-16 of text in any
    script: they hold a byte of :data:`_CONTROL` and read, in one byte order, as characters
    that are all assigned text (tab, LF and CR aside). Bytes of 8-bit text paired as UTF-16
    mostly make assigned ideographs ("ab" is U+6261), but never hold such a byte. A file
    shorter than the head, whose few pairs may all read as assigned by chance, must also be of
    whole code units and hold a line break in that byte order."""
    head = raw[:min(len(raw), _SHAPE_BYTES) & ~1]
    if len(raw) % 2 or len(head) < 8 or _CONTROL.isdisjoint(head):
        return False  # UTF-16 is whole code units
    for codec in ("utf-16-le", "utf-16-be"):
        try:
            text = head.decode(codec)
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 2:  # a surrogate pair the head's end cut is still text
                continue
            text = head[:exc.start].decode(codec)
        if all(c in "\t\n\r" or unicodedata.category(c) not in _NOT_TEXT for c in text) and (
                len(head) == _SHAPE_BYTES or "\n" in raw.decode(codec, errors="replace")):
            return True  # a short file's few pairs may all read as assigned by chance: its line breaks must too
    return False
