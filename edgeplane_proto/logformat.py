"""How edgeplane's processes log: ``edgeplane serve``, ``edgeplane gateway`` and
``edgeplane-agent`` all configure logging here (``--log-level``, ``--log-format``,
``--access-log``), so that a fleet's log shipper reads one format from all of them.

``text`` (the default) is the human line it always was. ``json`` is one object per line,
``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``, then the record's own fields (those a
call gave with ``extra=``: an access line's) and ``exc``, a failure's traceback as one string,
so that no traceback spreads over lines a shipper would take for records of their own. Every
logger of the process writes through the one handler set here: uvicorn's (``runloop``
hands it no configuration of its own) and gRPC's included.

The access log (``edgeplane.access``, docs/security.md) is off unless asked for: the
gateway and the agent then write one line per request, naming the request (its id, method,
route template, the model its path names when the server knows it, the site that answered,
status, bytes in and out, duration) and nothing of the person who sent it: no address, token,
query string or body, nor a model's name the server does not know. It is written
whatever ``--log-level`` says: an operator who asked for it gets it. This module is shared
code because the agent stands alone (it never imports the control plane).

Log lines name what callers and agents wrote (a model name in a URL's path, a site's name, a
replica's error), and a text line written as given would let them write lines of their own
into the log, or move and colour an operator's terminal. So in ``text`` every control
character of a record (C0, DEL, C1, and the Unicode line and paragraph separators) is
written as its Python escape (``\n``, ``\r``, ``\t``, ``\x1b``, ``\x9b``, ``\u2028``) by
:class:`TextFormatter`, the one place that writes text lines: one record is one line, a
traceback's own line breaks excepted. ``json`` escapes them as JSON does. An access line also
cuts the model (only one the server knows: :class:`AccessLog`) and the site (what a
replica's answer said) to :data:`MAX_VALUE` characters, and in text writes their spaces as
``\x20``, so that its ``key=value`` fields cannot be faked either (:func:`access_value`).
docs/security.md says the same."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

#: ``--log-format`` values.
FORMATS = ("text", "json")
#: ``--log-level`` values, any case.
LEVELS = ("debug", "info", "warning", "error")
#: The access log's logger.
ACCESS = "edgeplane.access"
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The most characters of a caller's value (a model name, a site) an access line writes.
MAX_VALUE = 256

# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# What every LogRecord has: the rest of its attributes are the fields a call gave (``extra=``).
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, whatever the record holds: a formatter that
    raises loses the line, and logging writes a traceback over many lines in its place."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        try:
            out["msg"] = record.getMessage()
        except Exception:  # arguments that do not fit the message (a slip in a log call): both, as given
            out["msg"] = _text(record.msg, str)
            out["args"] = _text(record.args, repr)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(out, default=str, allow_nan=False)
        except Exception:  # a field JSON cannot write (a key that is no text, a loop, NaN, no str()): that field as text
            return json.dumps({key if isinstance(key, str) else _text(key, str): _writable(value) for key, value in out.items()},
                              default=str, allow_nan=False)


def _writable(value: Any) -> Any:
    """``value`` where JSON writes it (with ``str`` for what it does not know), else its text."""
    try:
        json.dumps(value, default=str, allow_nan=False)
    except Exception:
        return _text(value, str)
    return value


def _text(value: Any, show: Callable[[Any], str]) -> str:
    try:
        return show(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"


def _escaped(found: re.Match[str]) -> str:
    char = found.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape(text: str) -> str:
    """``text`` with each control character written as its Python escape: one line, nothing a
    terminal acts on."""
    return _CONTROL.sub(_escaped, text)


class TextFormatter(logging.Formatter):
    """The text line, its control characters escaped (:func:`escape`); a traceback keeps its
    line breaks, its other control characters escaped too."""

    def __init__(self) -> None:
        super().__init__(TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _CONTROL_BUT_NEWLINE.sub(_escaped, super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _CONTROL_BUT_NEWLINE.sub(_escaped, super().formatStack(stack_info))


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(level: str, log_format: str = "text") -> None:
    """The process's logging: every record at ``level`` or above (the access log's at any
    level) to stderr, in ``log_format``; what was configured before is replaced."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger(ACCESS).setLevel(logging.INFO)


@dataclasses.dataclass(frozen=True)
class AccessLog:
    """Where a server's access lines go (``--access-log``), and the model names it knows
    (``known``: the gateway's endpoint table, the agent's assignments). A model's name in a
    path is the caller's text until the server knows it, and may hold anything (an e-mail
    address, a line break and a line of the caller's): a line names only a known one."""

    log: logging.Logger
    known: Callable[[str], bool]

    def write(self, request_id: str | None, method: str, route: str | None, model: str | None, site: str | None,
              status: int | None, bytes_in: int, bytes_out: int, duration_ms: float, grpc_status: str | None = None,
              failover: str | None = None, skipped: str | None = None) -> None:
        """One request's access line: in text a short line, in JSON these fields. ``route``: the
        path's template (``/v2/models/{model}/infer``), None for a path no route has (the path
        itself may hold anything); ``model``: the name the path gives, written only when known;
        ``status`` the HTTP status, None when no answer was sent or for a gRPC call, whose code
        is ``grpc_status`` by name (``NOT_FOUND``): one JSON field holds one type, which a log
        store's index of it needs; ``site``: the one that answered (at a gateway);
        both cut to :data:`MAX_VALUE` characters (:func:`access_value`); ``failover``: the sites
        a gateway's request moved on from before ``site`` answered (``X-Edgeplane-Failover``),
        cut alike, written in text only when there are some; ``skipped``: the nearer replicas
        it passed over untried, each ``site=reason`` (``X-Edgeplane-Skipped``), cut and written alike."""
        model = access_value(model) if model is not None and self.known(model) else None
        site, failover, skipped = access_value(site), access_value(failover or None), access_value(skipped or None)
        moved = (f" failover={_spaceless(failover)}" if failover else "") + (f" skipped={_spaceless(skipped)}" if skipped else "")
        self.log.info("%s %s %s model=%s site=%s status=%s in=%d out=%d ms=%.2f%s", request_id or "-", method, route or "-",
                      _spaceless(model), _spaceless(site), grpc_status or (status if status is not None else "-"), bytes_in, bytes_out, duration_ms,
                      moved, extra={"request_id": request_id, "method": method, "route": route, "model": model, "site": site,
                                    "status": status, "grpc_status": grpc_status, "bytes_in": bytes_in, "bytes_out": bytes_out,
                                    "duration_ms": round(duration_ms, 3), "failover": failover,
                                    "skipped": skipped})


def access_log(enabled: bool, known: Callable[[str], bool]) -> AccessLog | None:
    """The access log when ``enabled`` (``--access-log``), naming the models ``known`` says
    the server has; else None: a server given None checks that once per request and does
    nothing more."""
    return AccessLog(logging.getLogger(ACCESS), known) if enabled else None


def access_value(value: str | None) -> str | None:
    """``value`` (a model, a site) as an access line keeps it: its first :data:`MAX_VALUE` characters,
    then ``...(+N)`` for the N left out."""
    if value is None or len(value) <= MAX_VALUE:
        return value
    return f"{value[:MAX_VALUE]}...(+{len(value) - MAX_VALUE})"


def _spaceless(value: str | None) -> str:
    """``value`` as one ``key=value`` field of a text access line: ``-`` for none, a space ``\\x20``."""
    return "-" if not value else value.replace(" ", "\\x20")
