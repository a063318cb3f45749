"""The control plane's hold, as the commands that wait on it say it (``apply --wait``, ``drain --wait``).

While a stored object this version cannot read holds every change (``hold`` of
``GET /v1/controlplane``, as ``edgeplane status`` shows it), nothing a command waits on is
planned and no object's status says why: a deployment's reads as not planned yet, a drain's
as Pending. The waiting commands read the hold themselves and say it the same way, once
each time it changes, then go on waiting (the hold may be lifted in time).
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.cli import events
from orchestrator.cli.http import ApiClient, CliError


def reason(api: ApiClient) -> str:
    """Why the control plane holds every change (a stored object this version cannot read),
    "" when it holds none. A control plane that does not say (an older one, or a token
    refused this view) holds none as far as is known; one that is away raises, as the
    waiting command's own reads do."""
    try:
        return str(api.request("GET", "/v1/controlplane").get("hold") or "")
    except CliError as exc:
        if events.wait_to_ask_again(exc, 1.0) is not None:  # away: the waiting command says so
            raise
        return ""


def noticed(api: ApiClient, held: str, say: Callable[[str], None]) -> str:
    """The hold now (:func:`reason`), said as a ``warning:`` progress line when it differs
    from ``held``, the one said before ("" for none)."""
    now = reason(api)
    if now and now != held:
        say(f"warning: {now}; still waiting (until --timeout)")
    return now


def suffix(held: str) -> str:
    """What a timeout line adds about the hold: "; <why>" while one holds, else ""."""
    return f"; {held}" if held else ""
