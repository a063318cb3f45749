"""argparse types shared by the commands' options: a bad value is a usage error (exit 2)
naming the option, before anything starts or any request is sent; :class:`Parser` says it
in one line."""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any, NoReturn

from edgeplane_proto import endpoint_url, logformat


#: ``--log-level`` values, any case (``type=str.lower``).
LOG_LEVELS = logformat.LEVELS


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` names an option's default when it has one worth saying (not None, False or
    empty) and its help does not say it already (``default 5``, ``[all]``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default is argparse.SUPPRESS
                or default == [] or default == ""
                or "default" in text or "%(default)" in text or text.rstrip().endswith("]")):
            return action.help
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose error about one option's value is one line, as the commands'
    own errors are (``edgeplane gateway: error: argument --port: 99999 is not a port
    (0-65535)``); other usage errors (a missing argument) keep the usage before them.
    ``--help`` shows defaults (:class:`DefaultsFormatter`), in its subcommands too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)


def lat_lon(text: str) -> tuple[float, float]:
    """argparse type of the caller's ``--location``: ``lat,lon`` in degrees."""
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not lat,lon, e.g. 48.85,2.35") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):  # NaN fails both
        raise argparse.ArgumentTypeError(f"{text!r} is outside -90..90, -180..180")
    return lat, lon


def host_name(text: str) -> str:
    """argparse type of ``--allowed-host``: a DNS name or an IP address, without a port (any
    port is allowed), in lower case."""
    name = text.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", name) or len(name) > 253:
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or address (give it without scheme or port, e.g. ops.example.com)")
    return name


def listen_host(text: str) -> str:
    """argparse type of a host to serve on (``--host``, ``--agent-host``): an IPv6 address
    with or without the brackets URLs and ``edgeplane-agent --listen`` write it in."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or "[" in host or "]" in host:
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or address to serve on (e.g. 0.0.0.0, ::, [::1])")
    return host


def reachable_url(text: str) -> str:
    """argparse type of a URL this process gives others to reach it (``--public-url``): the
    rule an agent's endpoint is held to (:mod:`edgeplane_proto.endpoint_url`)."""
    refused = endpoint_url.refusal(text)
    if refused is not None:
        raise argparse.ArgumentTypeError(refused)
    return text


def dial_address(text: str) -> str:
    """argparse type of a ``HOST:PORT`` other processes dial (``--peer-address``), kept as
    written: a port from 1 to 65535, an IPv6 host in brackets, no wildcard address."""
    parts = urllib.parse.urlsplit(f"//{text}")
    try:
        port = parts.port
    except ValueError:  # out of range, not a number, or an IPv6 host without brackets
        port = None
    if not parts.hostname or not port or parts.path or parts.query or parts.fragment or parts.username is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT with a port from 1 to 65535 (an IPv6 address in "
                                         "brackets, e.g. [2001:db8::5]:8081)")
    try:
        if ipaddress.ip_address(parts.hostname).is_unspecified:
            raise argparse.ArgumentTypeError(f"{text!r} is an address to listen on, not one to dial: give a reachable one")
    except ValueError:
        pass  # a host name
    return text


def port_number(text: str) -> int:
    """argparse type of the commands' ``--port`` options: a TCP port, 0 (any free one) to 65535."""
    port = _whole(text, "is not a port number")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def number(low: float, high: float | None = None, *, above: bool = False, below: bool = False) -> Callable[[str], float]:
    """argparse type of a finite number from ``low`` to ``high`` (no upper bound when None);
    ``above``/``below`` leave that end out: ``number(0, above=True)`` is "more than 0"."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if above else value < low
        too_high = high is not None and (value >= high if below else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_range(low, high, above, below)}")
        return value
    return parse


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type of a whole number from ``low`` to ``high`` (no upper bound when None)."""
    def parse(text: str) -> int:
        n = _whole(text, "is not a whole number")
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"{n} is not {_range(low, high, False, False)}")
        return n
    return parse


#: The units a duration may carry (``duration``); a bare number is seconds.
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(low_s: float) -> Callable[[str], float]:
    """argparse type of a retention: a number of seconds, or one with a unit (``90m``,
    ``12h``, ``30d``), of at least ``low_s``; ``0`` or ``off`` is 0.0, keep everything."""
    def parse(text: str) -> float:
        word = text.strip().lower()
        if word in ("off", "0"):
            return 0.0
        number, unit = (word[:-1], word[-1]) if word[-1:].isalpha() else (word, "s")
        try:
            value = float(number) * DURATION_UNITS[unit]
        except (ValueError, KeyError):
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give e.g. 30d, 12h, 90m or 3600 (seconds); 0 or off keeps all")
        if value == 0:
            return 0.0
        if value < low_s:
            raise argparse.ArgumentTypeError(f"{text!r} is less than {_duration_text(low_s)}: give {_duration_text(low_s)} or more, "
                                             "or 0 or off to keep all")
        return value
    return parse


def _duration_text(seconds: float) -> str:
    for unit, scale in sorted(DURATION_UNITS.items(), key=lambda u: -u[1]):
        if seconds >= scale and seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


def _range(low: float, high: float | None, above: bool, below: bool) -> str:
    if high is None:
        return f"more than {low:g}" if above else f"{low:g} or more"
    if above or below:
        return f"{'more than' if above else 'at least'} {low:g} and {'less than' if below else 'at most'} {high:g}"
    return f"from {low:g} to {high:g}"


def _whole(text: str, otherwise: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} {otherwise}") from None


#: argparse type of ``--limit`` (events, captures): 1 to 10000, the most the API answers with.
item_count = whole_number(1, 10_000)
