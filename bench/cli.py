"""The command line the benchmark modules share, so each reads its flags, prints its
table and writes its JSON to ``bench/results/`` the same way."""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

Report = dict[str, Any]


def parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the module's docstring, with ``--quick``."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    out.add_argument("--quick", action="store_true", help=quick_help)
    return out


def main(parsed: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], Awaitable[Report]],
         print_table: Callable[[Report], None], results: pathlib.Path) -> int:
    """Run the benchmark with the parsed flags, print its table and write its report."""
    report = asyncio.run(run(parsed.parse_args(argv)))
    print_table(report)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {results}")
    return 0
