"""What makes a name that looks valid a refused one: the first character that is not ASCII.

A name, a label key or value and a site's name are ASCII, but a refused one can look valid
when quoted: a Cyrillic 'р' looks like the Latin 'p', and a zero-width space, a combining
accent or a no-break space is not seen at all. The manifests' refusals, the agent's
``--site`` and ``--label`` and the control plane's refusal of a join name that character
alike, by its position, code point and Unicode name, so the operator knows what to retype.
"""

from __future__ import annotations


def explain(value: object) -> str:
    """``"; its character N is U+XXXX NAME, not ASCII"`` for the first character of ``value``
    that is not ASCII, to append to a refusal; ``""`` for ASCII text and for what is not text."""
    if not isinstance(value, str):
        return ""
    at, char = next(((i, c) for i, c in enumerate(value, 1) if not c.isascii()), (0, ""))
    if not char:
        return ""
    import unicodedata  # only for a name refused: the idle agent imports nothing it does not use

    return f"; its character {at} is U+{ord(char):04X} {unicodedata.name(char, 'with no name')}, not ASCII"
