"""``--log-format json`` on records a log call made oddly: a message whose ``%`` arguments do
not fit it, a field (``extra=``) JSON cannot write (a key that is no text, a value that holds
itself, NaN, an object whose ``str`` fails), bytes that are no UTF-8, a very long message.
Each is still one JSON object on one line, with what could be said of it: a formatter that
raises loses the line, and logging writes a traceback over many lines in its place, which a
log shipper takes for records of their own."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from edgeplane_proto import logformat


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


def _looped() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


def _strict(text: str) -> dict[str, Any]:
    """``text`` as JSON, refusing NaN and Infinity, which are no JSON a shipper reads."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("msg", "args", "extra", "said", "fields"), [
    ("%d requests", ("many",), None, "%d requests", {}),  # arguments that do not fit the message
    ("%s and %s", ("one",), None, "%s and %s", {}),  # too few
    (Unprintable(), (), None, None, {}),  # a message with no text
    ("ok", (), {"table": {(1, 2): 3}}, "ok", {"table": "{(1, 2): 3}"}),  # a key JSON cannot write
    ("ok", (), {(1, 2): 3}, "ok", {"(1, 2)": 3}),  # a field whose own name is no text
    ("ok", (), {"loop": _looped()}, "ok", {"loop": "{'self': {...}}"}),  # a value that holds itself
    ("ok", (), {"ratio": float("nan"), "big": float("inf")}, "ok", {"ratio": "nan", "big": "inf"}),
    ("ok", (), {"who": Unprintable()}, "ok", None),  # a value with no text
    ("ok", (), {"raw": b"\xff\xfe"}, "ok", {"raw": "b'\\xff\\xfe'"}),  # bytes that are no UTF-8
    ("path %s", ("/tmp/\udcff",), None, "path /tmp/\udcff", {}),  # a lone surrogate (a file name read with surrogateescape)
    ("x" * 1_000_000, (), None, "x" * 1_000_000, {}),
], ids=["args-wrong-type", "args-too-few", "msg-unprintable", "key-not-text", "field-name-not-text", "cycle", "nan", "value-unprintable", "bytes",
        "surrogate", "long"])
def test_an_odd_record_is_still_one_json_line(msg: Any, args: tuple[Any, ...], extra: dict[str, Any] | None, said: str | None,
                                              fields: dict[str, Any] | None, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logformat.JsonFormatter())
    log = logging.Logger("odd")  # its own logger, apart from the process's
    log.addHandler(handler)
    log.warning(msg, *args, extra=extra)
    assert capsys.readouterr().err == ""  # where logging writes a formatter's failure, over many lines
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines[:3]
    record = _strict(lines[0])
    assert (record["level"], record["logger"]) == ("warning", "odd")
    if said is not None:
        assert record["msg"] == said
    else:
        assert isinstance(record["msg"], str)
    if args and said == msg:  # the arguments that did not fit are kept beside it
        assert record["args"] == repr(args)
    for key, value in (fields or {}).items():
        assert record[key] == value
    if fields is None:
        assert set(extra or ()) <= record.keys()
