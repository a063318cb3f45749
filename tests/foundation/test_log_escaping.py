"""The text log's escaping rule (``edgeplane_proto.logformat``, docs/security.md): what a
caller or an agent wrote stays on the line of its record and moves no terminal. The processes
that log through it are tests/foundation/test_access_log.py and tests/agent/test_access_log.py."""

from __future__ import annotations

import io
import logging

import pytest

from edgeplane_proto import logformat


@pytest.mark.parametrize(("given", "written"), [
    ("mlp", "mlp"),
    ("a\nb", r"a\nb"),
    ("a\r\nb", r"a\r\nb"),
    ("a\tb", r"a\tb"),
    ("\x1b[31mred\x1b[0m", r"\x1b[31mred\x1b[0m"),
    ("\x00\x07\x08\x7f", r"\x00\x07\x08\x7f"),
    ("\x9b2J\x85", r"\x9b2J\x85"),  # C1: CSI, NEL
    ("a\u2028b\u2029c", r"a\u2028b\u2029c"),
    ("café ü 日本 \u200b", "café ü 日本 \u200b"),  # printable text is kept
    ("back\\slash", "back\\slash"),
])
def test_escape(given: str, written: str) -> None:
    assert logformat.escape(given) == written


def logged(log_format: str, *args: object, exc: bool = False) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logformat.formatter(log_format))
    log = logging.Logger("edgeplane.test")
    log.addHandler(handler)
    if exc:
        try:
            raise ValueError("bad \x1b[2J model\r")
        except ValueError:
            log.exception("%s failed", *args)
    else:
        log.warning("model %s: %s", *args)
    return out.getvalue()


def test_a_text_record_is_one_line_whatever_its_values_hold() -> None:
    text = logged("text", "a\nb 2025-05-02 INFO x: forged", "\x1b]0;title\x07")
    assert text.count("\n") == 1 and text.endswith(r"model a\nb 2025-05-02 INFO x: forged: \x1b]0;title\x07" + "\n"), text


def test_a_text_traceback_keeps_its_lines_and_loses_its_control_characters() -> None:
    text = logged("text", "m\x1b[31m", exc=True)
    first, *rest = text.splitlines()
    assert first.endswith(r"m\x1b[31m failed") and rest[0] == "Traceback (most recent call last):", text
    assert rest[-1] == r"ValueError: bad \x1b[2J model\r" and "\x1b" not in text and "\r" not in text, text


def test_an_access_line_cuts_a_long_value_and_keeps_its_fields_apart() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logformat.formatter("text"))
    log = logging.Logger("edgeplane.access")
    log.addHandler(handler)
    logformat.AccessLog(log, known=lambda name: True).write("r1", "POST", "/v2/models/{model}/infer", "a status=200", "s" * 300, 404, 1, 2, 0.5)
    assert out.getvalue().endswith(f"r1 POST /v2/models/{{model}}/infer model=a\\x20status=200 site={'s' * 256}...(+44) "
                                   "status=404 in=1 out=2 ms=0.50\n"), out.getvalue()
