"""The options of the commands callers and operators run are named in the docs: a flag the
parser takes that no doc names is one nobody finds (or one a doc forgot when it was added)."""

from __future__ import annotations

import argparse
import pathlib
import re

import pytest

from orchestrator.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """What ``parser`` takes: its options and positionals, and its subcommands as one action.
    Read from argparse's private list, the one place these tests do: argparse has no public
    reader of what a parser takes, only the help text it prints from it."""
    return list(parser._actions)


def command(*path: str) -> argparse.ArgumentParser:
    parser = main.build_parser()
    for name in path:
        parser = next(a.choices[name] for a in actions(parser)  # the subcommands': a parser by name
                      if isinstance(a.choices, dict) and isinstance(a.choices.get(name), argparse.ArgumentParser))
    return parser


def options(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """Each option's spellings (``("-o", "--output")``), help left out."""
    return [tuple(a.option_strings) for a in actions(parser) if a.option_strings and a.dest != "help"]


def named_in(text: str, spellings: tuple[str, ...]) -> bool:
    return any(re.search(rf"`{re.escape(s)}(?=[ `=])", text) for s in spellings)


def test_the_deploy_guide_lists_every_option_of_the_standalone_gateway() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    start = text.index("Options: `--control-plane URL")
    paragraph = text[start:text.index("\n\n", start)]
    missing = [s[-1] for s in options(command("gateway")) if not named_in(paragraph, s)]
    assert not missing, f"docs/deploy.md's option list of `edgeplane gateway` leaves out {missing}"


@pytest.mark.parametrize("path", [("infer",), ("chat",), ("cascade", "tune")], ids=" ".join)
def test_every_option_of_the_callers_commands_is_named_in_the_docs(path: tuple[str, ...]) -> None:
    missing = [s[-1] for s in options(command(*path)) if not named_in(DOCS, s)]
    assert not missing, f"no doc names these options of `edgeplane {' '.join(path)}`: {missing}"
