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
code because the agent stands alone (it never imports the control plane)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
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
            return json.dumps({key: _writable(value) for key, value in out.items()}, default=str, allow_nan=False)


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


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT)


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
              status: int | None, bytes_in: int, bytes_out: int, duration_ms: float) -> None:
        """One request's access line: in text a short line, in JSON these fields. ``route``: the
        path's template (``/v2/models/{model}/infer``), None for a path no route has (the path
        itself may hold anything); ``model``: the name the path gives, written only when known;
        ``status`` None when no answer was sent; ``site``: the one that answered (at a gateway)."""
        model = model if model is not None and self.known(model) else None
        self.log.info("%s %s %s model=%s site=%s status=%s in=%d out=%d ms=%.2f", request_id or "-", method, route or "-",
                      model or "-", site or "-", status if status is not None else "-", bytes_in, bytes_out, duration_ms,
                      extra={"request_id": request_id, "method": method, "route": route, "model": model, "site": site,
                             "status": status, "bytes_in": bytes_in, "bytes_out": bytes_out, "duration_ms": round(duration_ms, 3)})


def access_log(enabled: bool, known: Callable[[str], bool]) -> AccessLog | None:
    """The access log when ``enabled`` (``--access-log``), naming the models ``known`` says
    the server has; else None: a server given None checks that once per request and does
    nothing more."""
    return AccessLog(logging.getLogger(ACCESS), known) if enabled else None
