"""How a command that failed says so: for people, ``error: <why>`` on stderr and a line per
detail after it; for scripts (``-o json``, ``-o yaml``), one object on stderr in the control
API's error shape: ``error``, ``reason``, and what a refusal named besides (``parameter``,
``field``, ``issues``). The exit code is the same either way, decided here for every command.

``reason`` is the control API's where it refused (docs/api.md, Error reasons); where the CLI
decided by itself, one of those that fits, or one of its own below, by the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, NoReturn

from orchestrator import argtypes
from orchestrator.api import reasons
from orchestrator.cli import render
from orchestrator.cli.http import CliError
from orchestrator.manifests.errors import ManifestError

#: Exit code 3: no answer came from the control plane (nothing listening, a timeout, TLS that failed).
UNREACHABLE = "Unreachable"
#: Exit code 1 where the control plane refused nothing: the CLI found the command cannot be done
#: (an answer it cannot read, a sample file it cannot replay, a gateway's refusal of an inference).
NOT_DONE = "NotDone"
#: The reason of an exit code where nothing more precise is known.
_BY_CODE = {1: NOT_DONE, 2: str(reasons.Reason.BAD_REQUEST), 3: UNREACHABLE}


@dataclasses.dataclass(frozen=True)
class Failure:
    message: str
    code: int
    reason: str
    details: list[str] = dataclasses.field(default_factory=list)  # lines after the message, for people
    said: dict[str, Any] = dataclasses.field(default_factory=dict)  # the same for scripts, and more


class UsageError(Exception):
    """A command's arguments its parser refused, raised (not printed) where ``-o json|yaml`` asks
    for the one object: :class:`ScriptParser`."""


class ScriptParser(argtypes.Parser):
    """The CLI's parser where ``-o json|yaml`` was asked: its usage errors are raised, as
    :class:`UsageError`, for :func:`report` to say (``--help`` and ``--version`` print as ever)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def output_asked(argv: list[str]) -> str | None:
    """The ``-o``/``--output`` that ``argv`` gives, before it is parsed (None where it gives none
    or cannot be read so): a usage error is said in that form."""
    early = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    early.add_argument("-o", "--output")
    try:
        return early.parse_known_args(argv)[0].output
    except argparse.ArgumentError:
        return None


def of_usage(exc: UsageError) -> Failure:
    return Failure(str(exc), 2, str(reasons.Reason.BAD_REQUEST))


def of_cli_error(exc: CliError) -> Failure:
    return Failure(str(exc), exc.code, exc.reason or _BY_CODE.get(exc.code, NOT_DONE), exc.details, exc.said)


def of_manifests(exc: ManifestError) -> Failure:
    """Manifests the CLI refused before sending them, said as the control plane says them (a 422)."""
    return Failure(f"{len(exc.issues)} problem(s) in the manifests", 1, str(reasons.Reason.INVALID),
                   [str(i) for i in exc.issues], {"issues": [i.to_dict() for i in exc.issues]})


def report(failure: Failure, output: str | None) -> int:
    """``failure`` on stderr, in ``output``'s form (json and yaml: one object); its exit code."""
    if output in ("json", "yaml"):
        render.dump({"error": failure.message, "reason": failure.reason, **failure.said}, output, sys.stderr)
    else:
        print(f"error: {failure.message}", file=sys.stderr)
        for line in failure.details:
            print(f"  {line}", file=sys.stderr)
    return failure.code
