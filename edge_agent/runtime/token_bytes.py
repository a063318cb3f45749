"""The bytes of tokens that are only part of a character (and the text of the tokens the
library does not decode), read from a ``tokenizer.json``.

OpenAI's ``logprobs`` give each token's own bytes (``bytes``) so that a client can join the
tokens that split a character ("é" is two tokens in a byte-level vocabulary: 0xC3, 0xA9) back
into text. onnxruntime-genai decodes one such token to U+FFFD, whose bytes are no part of
the answer; what the token is, one byte or a few, is written only in the vocabulary:

- a byte-level BPE (GPT-2, Llama 3, Qwen: a ``ByteLevel`` decoder) spells every byte as one
  printable character (0xC3 is ``Ã``, a space ``Ġ``);
- a SentencePiece vocabulary with byte fallback (Llama 2, Mistral: a ``ByteFallback``
  decoder) has one token ``<0xC3>`` per byte.

Only the tokens whose bytes are not UTF-8 on their own are kept: every other token's text,
as the library decodes it, is already what it adds to the answer. Two more kinds of token
the library cannot give the text of, :func:`shown_tokens` adds: a special token
(``<|im_end|>``, ``</s>``: the library leaves it out of what it decodes) shows as its own
text, and one holding a NUL byte (its C API ends a string there) as that text, NUL
included (JSON writes it ``\\u0000``): a token whose bytes are text shows that text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def shown_tokens(tokenizer: Any) -> dict[int, tuple[str, bytes]]:
    """Token id -> (how logprobs show it, its bytes) for each token of a parsed
    ``tokenizer.json`` whose text the library does not decode: parts of a character and
    (shown as their bytes), tokens holding a NUL byte and special tokens (their own text)."""
    out = {token_id: (raw.decode() if _is_utf8(raw) else display(raw), raw) for token_id, raw in _token_bytes(tokenizer)
           if not _is_utf8(raw) or b"\x00" in raw}
    added = tokenizer.get("added_tokens") if isinstance(tokenizer, Mapping) else None
    for token in added if isinstance(added, list) else ():
        if isinstance(token, Mapping) and token.get("special") is True and isinstance(token_id := token.get("id"), int) \
                and isinstance(text := token.get("content"), str):
            out[token_id] = (text, text.encode())
    return out


def special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The text of each special token of a parsed ``tokenizer.json`` (``<|im_start|>``,
    ``</s>``...): the library's tokenizer reads such text as the token wherever it occurs."""
    added = tokenizer.get("added_tokens") if isinstance(tokenizer, Mapping) else None
    return tuple(token["content"] for token in (added if isinstance(added, list) else ())
                 if isinstance(token, Mapping) and token.get("special") is True and isinstance(token.get("content"), str)
                 and token["content"])


def stream_tokens(tokenizer: Any) -> dict[int, bytes]:
    """Token id -> the bytes of each token of a parsed ``tokenizer.json`` whose text an answer
    takes from its bytes, not from the library: in a byte-level BPE (GPT-2, Llama 3, Qwen,
    SmolLM) or a vocabulary with byte fallback (Llama 2, Mistral, Gemma), a token that is part
    of a character or holds a NUL byte. Its bytes are its text wherever it stands: a
    byte-level token's text is its bytes, and a byte-fallback token is one byte (the ``▁``
    of a SentencePiece vocabulary, whose text depends on where it stands, is in other
    tokens). Empty for a vocabulary of another kind."""
    return {token_id: raw for token_id, raw in _token_bytes(tokenizer) if not _is_utf8(raw) or b"\x00" in raw}


def spells_bytes(tokenizer: Any) -> bool:
    """Whether a parsed ``tokenizer.json`` spells out the bytes of its tokens in a way read
    here (a byte-level BPE, byte fallback): when it does not, a token the library decodes to
    U+FFFD may be part of a character whose bytes are not known. Its special tokens say
    nothing of that."""
    return next(_token_bytes(tokenizer), None) is not None


def _token_bytes(tokenizer: Any) -> Iterator[tuple[int, bytes]]:
    """Token id and bytes of each token whose bytes the vocabulary spells out (a byte-level
    BPE's, a SentencePiece vocabulary's byte tokens)."""
    if not isinstance(tokenizer, Mapping) or not isinstance(model := tokenizer.get("model"), Mapping):
        return
    kinds = set(_decoder_types(tokenizer.get("decoder")))
    byte_level = _byte_level_alphabet() if "ByteLevel" in kinds else None
    byte_fallback = "ByteFallback" in kinds or bool(model.get("byte_fallback"))
    for piece, token_id in _vocab(model.get("vocab")):
        if byte_fallback and (m := _BYTE_TOKEN.fullmatch(piece)):
            yield token_id, bytes([int(m.group(1), 16)])
        elif byte_level is not None and all(c in byte_level for c in piece):
            yield token_id, bytes(byte_level[c] for c in piece)


def display(raw: bytes) -> str:
    """How OpenAI's API shows a token that is not text on its own: ``bytes:\\xc3\\xa9``."""
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _decoder_types(decoder: Any) -> Iterator[str]:
    if isinstance(decoder, Mapping):
        yield str(decoder.get("type"))
        for inner in decoder.get("decoders") or ():
            yield from _decoder_types(inner)


def _vocab(vocab: Any) -> Iterator[tuple[str, int]]:
    if isinstance(vocab, Mapping):  # BPE, WordPiece: piece -> id
        for piece, token_id in vocab.items():
            if isinstance(piece, str) and isinstance(token_id, int):
                yield piece, token_id
    elif isinstance(vocab, list):  # Unigram: [piece, score] at its id
        for token_id, entry in enumerate(vocab):
            if isinstance(entry, list) and entry and isinstance(entry[0], str):
                yield entry[0], token_id


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's character for each byte: printable Latin-1 bytes stand for themselves, the
    others (control characters, the space, 0x7F-0xA0, 0xAD) for 256 onwards, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {chr(c): b for b, c in chars.items()}


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
