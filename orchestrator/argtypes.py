"""argparse types shared by the commands' options: a bad value is a usage error (exit 2)
naming the option, before anything starts or any request is sent."""

from __future__ import annotations

import argparse


def lat_lon(text: str) -> tuple[float, float]:
    """argparse type of the caller's ``--location``: ``lat,lon`` in degrees."""
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not lat,lon, e.g. 48.85,2.35") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):  # NaN fails both
        raise argparse.ArgumentTypeError(f"{text!r} is outside -90..90, -180..180")
    return lat, lon


def item_count(text: str) -> int:
    """argparse type of ``--limit`` (events, captures): 1 to 10000, the most the API answers with."""
    n = _whole(text, "is not a whole number")
    if not 1 <= n <= 10_000:
        raise argparse.ArgumentTypeError(f"{n} is not between 1 and 10000")
    return n


def port_number(text: str) -> int:
    """argparse type of the commands' ``--port`` options: a TCP port, 0 (any free one) to 65535."""
    port = _whole(text, "is not a port number")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535)")
    return port


def _whole(text: str, otherwise: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} {otherwise}") from None
