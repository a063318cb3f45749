"""``edgeplane chat MODEL PROMPT``: one chat answer, streamed to the terminal.

It goes the way an application's would (:meth:`orchestrator.client.Client.chat`): the
nearest generative replica directly, then the gateway; the site that answered and the time
to first token are printed after the answer (on stderr, so that stdout is the text alone).
``-o json|yaml`` asks for the whole answer at once and prints it with those facts.

Unlike the API, which generates up to the model's context when a request sets no
``max_tokens``, the command stops at :data:`DEFAULT_MAX_TOKENS` unless told otherwise: a
terminal (and ``-o json``, which prints nothing until the end) should not wait minutes
for a model that rambles. The finish reason then says ``length``. When that default does not
fit the model's context (the replica refuses it with ``context_length_exceeded``), the
question is asked again without it; a ``--max-tokens`` that does not fit is refused.

``--timeout`` is the client's: the replicas and the gateway tried share it, so the command
gives up after that long when no answer has come (exit 3).
"""

from __future__ import annotations

import argparse
import sys
import time

from orchestrator import client as client_mod
from orchestrator import clientargs
from orchestrator.cli import render
from orchestrator.cli.http import ApiClient, CliError, tls_problem, token_from_env, unreached


#: Tokens generated when ``--max-tokens`` is not given.
DEFAULT_MAX_TOKENS = 512


def run(api: ApiClient, args: argparse.Namespace) -> int:
    if not args.model:
        raise CliError("MODEL is empty: name the model to ask (edgeplane get models)", 2)
    if args.timeout > clientargs.MAX_TIMEOUT_S:
        raise CliError(f"--timeout {args.timeout:g}: at most {clientargs.MAX_TIMEOUT_S:g} seconds (a year)", 2)
    params: dict[str, float] = {"max_tokens": args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    whole = args.output in ("json", "yaml")
    started = time.perf_counter()
    asked: list[client_mod.Chat] = []  # each answer as soon as it starts (a failed one may have printed part)
    try:
        app = client_mod.Client(api.server, token=token_from_env(getattr(args, "token", None)), location=args.location,
                                region=args.region, residency=args.residency, timeout=args.timeout)
    except (ValueError, TypeError) as exc:  # what the command's own checks let through (a port past 65535)
        raise CliError(str(exc), 2) from None
    try:
        with app as c:
            try:
                _ask(c, args.model, messages, whole, params, asked)
            except client_mod.InferenceError as exc:
                if args.max_tokens is not None or exc.code != "context_length_exceeded" or (asked and asked[-1].text):
                    raise
                # the default does not fit this model's context: let the context be the limit
                del params["max_tokens"]
                _ask(c, args.model, messages, whole, params, asked)
    except client_mod.EdgeplaneError as exc:
        if asked and asked[-1].text and not whole:
            print()  # end the partial answer's line before the error
        if isinstance(exc, client_mod.TimedOut):  # reached, but slow: not a question of where serve runs
            raise CliError(f"{exc}; --timeout SECONDS waits longer", 3) from None
        if isinstance(exc, client_mod.Unreachable) and tls_problem(exc) is not None:  # there, but not trusted
            raise CliError(unreached(api.server, exc), 3) from None
        if isinstance(exc, client_mod.Unreachable):
            raise CliError(f"{exc}; is 'edgeplane serve' running at {api.server}? (--server / EDGEPLANE_SERVER)", 3) from None
        raise CliError(str(exc)) from None
    elapsed = time.perf_counter() - started
    answer = asked[-1]
    ttft = f"{answer.ttft_s * 1000:.0f} ms" if answer.ttft_s is not None else "-"
    if whole:
        render.dump({"model": args.model, "servedBy": answer.site, "url": answer.url, "attempts": answer.attempts,
                     "timeToFirstTokenMs": round(answer.ttft_s * 1000, 2) if answer.ttft_s is not None else None,
                     "seconds": round(elapsed, 3), "finishReason": answer.finish_reason, "usage": answer.usage,
                     "content": answer.text}, args.output)
        return 0
    print()
    tokens = (answer.usage or {}).get("completion_tokens")
    print(f"[{answer.site or '?'} · first token {ttft} · {tokens if tokens is not None else '?'} tokens in {elapsed:.2f} s"
          f" · {answer.finish_reason or '?'}]", file=sys.stderr)
    return 0


def _ask(c: client_mod.Client, model: str, messages: list[dict[str, str]], whole: bool, params: dict[str, float],
         asked: list[client_mod.Chat]) -> None:
    """Ask, appending the answer to ``asked`` before any of it arrives; it streams to stdout
    as it comes unless ``whole``."""
    answer = c.chat(model, messages, stream=not whole, **params)
    asked.append(answer)
    for delta in answer:
        if not whole:
            sys.stdout.write(delta)
            sys.stdout.flush()
    return answer
