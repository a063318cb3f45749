"""The gateway's command-line options, shared by ``edgeplane serve`` (its in-process gateway)
and ``edgeplane gateway`` (a gateway on its own), so both take the same flags the same way."""

from __future__ import annotations

import argparse

from orchestrator import argtypes
from orchestrator.security import ratelimit

#: Largest inference request body (``--gateway-max-body``).
MAX_BODY = 16 * 1024 * 1024
#: ``--cold-start-timeout``: a request for a model scaled to zero waits this long (at most the max).
COLD_START_S = 30.0
COLD_START_MAX_S = 600.0
#: ``--first-token-timeout``: a streamed generation whose replica sends no first token this
#: long is tried on the next replica, and that replica is ejected (a whole answer, ``stream:
#: false``, is waited for as long as it takes).
FIRST_TOKEN_S = 60.0
FIRST_TOKEN_RANGE_S = (1.0, 3600.0)
#: ``--gateway-auth``: 'token' requires a valid API token on the model routes.
GATEWAY_AUTH = ("none", "token")


class OptionError(ValueError):
    """A gateway flag that cannot work; its message names the flag."""


def _rate(text: str) -> float:
    """argparse type of ``--gateway-rate``: 0 (no limit) or at least :data:`ratelimit.MIN_RATE`."""
    rate = argtypes.number(0)(text)
    if 0 < rate < ratelimit.MIN_RATE:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 0 (no limit) nor {ratelimit.MIN_RATE:g} or more")
    return rate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--location", help="the gateway's own position lat,lon (for callers that give none)")
    p.add_argument("--gateway-auth", choices=list(GATEWAY_AUTH), default="none",
                   help="'token' requires a valid API token (any role) on the gateway's model routes; 'none' leaves them open")
    p.add_argument("--gateway-rate", type=_rate, default=0.0, metavar="RPS",
                   help="per-client request rate, per gateway (client = token, else address); 0 = no limit")
    p.add_argument("--gateway-burst", type=argtypes.number(0), default=0.0, help="requests a client may send at once, 1 or more (default: the rate)")
    p.add_argument("--gateway-max-body", type=argtypes.whole_number(1), default=MAX_BODY, metavar="BYTES", help="largest inference request body")
    p.add_argument("--cold-start-timeout", type=argtypes.number(0, COLD_START_MAX_S), default=COLD_START_S, metavar="SECONDS",
                   help="how long a request for a model scaled to zero waits for its replica before a 503")
    p.add_argument("--first-token-timeout", type=argtypes.number(*FIRST_TOKEN_RANGE_S), default=FIRST_TOKEN_S, metavar="SECONDS",
                   help="a streamed generation whose replica sends no first token this long is tried on the next replica "
                        "(long prompts on slow hardware may need more)")
    p.add_argument("--access-log", action="store_true",
                   help="log one line per request answered (edgeplane.access): its id, route, model, the site that answered, "
                        "status, bytes and duration; never the caller's address, token, query or body (docs/security.md)")


def position(text: str | None) -> tuple[float, float] | None:
    """``--location lat,lon`` as a pair, None when not given."""
    if not text:
        return None
    try:
        return argtypes.lat_lon(text)
    except argparse.ArgumentTypeError as exc:
        raise OptionError(f"--location {exc}") from None


def problem(gateway_auth: str, rate: float, burst: float, max_body: int, cold_start_timeout_s: float,
            first_token_timeout_s: float = FIRST_TOKEN_S) -> str | None:
    """What is wrong with these gateway settings, or None (each command raises its own error)."""
    if gateway_auth not in GATEWAY_AUTH:
        return "--gateway-auth must be 'none' or 'token'"
    if rate < 0 or burst < 0 or max_body <= 0:
        return "--gateway-rate and --gateway-burst must be >= 0, --gateway-max-body > 0"
    if 0 < rate < ratelimit.MIN_RATE:  # a client's wait would overflow
        return f"--gateway-rate {rate:g} is too slow: give 0 (no limit) or {ratelimit.MIN_RATE:g} requests/s or more"
    if 0 < burst < 1:  # a bucket smaller than one request's cost would refuse every request forever
        return f"--gateway-burst {burst:g} is less than one request: give 1 or more (0: the rate)"
    if not 0 <= cold_start_timeout_s <= COLD_START_MAX_S:
        return f"--cold-start-timeout must be from 0 to {COLD_START_MAX_S:g} seconds"
    low, high = FIRST_TOKEN_RANGE_S
    if not low <= first_token_timeout_s <= high:
        return f"--first-token-timeout must be from {low:g} to {high:g} seconds"
    return None
