"""The decisions of a token's scope (orchestrator.gateway.scoping), as tables: which model
names it lets through and the residency a caller is held to."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.gateway import scoping
from orchestrator.scheduler import residency


@dataclass(frozen=True)
class Token:
    models: tuple[str, ...] = ()
    residency: tuple[str, ...] = ()


EU = residency.expand_residency(["EU"])


@pytest.mark.parametrize("token, names, allowed", [
    (None, ("any",), True),
    (Token(), ("any",), True),  # unscoped: as before
    (Token(("intent",)), ("intent",), True),
    (Token(("intent",)), ("other",), False),
    (Token(("intent",)), ("intent-cascade", "intent"), True),  # a cascade by its deployment's name, resolved to its model
    (Token(("intent-cascade",)), ("intent-cascade", "intent"), True),
    (Token(("intent",)), ("INTENT",), False),
])
def test_a_scope_lets_its_models_through_alone(token: Token | None, names: tuple[str, ...], allowed: bool) -> None:
    assert (scoping.refused_model(token, names) is None) is allowed


@pytest.mark.parametrize("token, asked, held", [
    (None, frozenset({"DE"}), frozenset({"DE"})),
    (Token(("intent",)), frozenset(), frozenset()),  # models alone: the caller's own residency
    (Token(residency=("FR",)), frozenset(), frozenset({"FR"})),  # no header: the token's
    (Token(residency=("FR",)), frozenset({"FR"}), frozenset({"FR"})),
    (Token(residency=("EU",)), frozenset({"FR", "DE"}), frozenset({"FR", "DE"})),  # narrower: kept
    (Token(residency=("EU",)), frozenset(), EU),
    (Token(residency=("FR",)), frozenset({"DE"}), None),  # another: refused, not overridden
    (Token(residency=("FR",)), EU, None),
])
def test_a_tokens_residency_holds_its_caller(token: Token | None, asked: frozenset[str], held: frozenset[str] | None) -> None:
    got = scoping.held_residency(token, asked)
    assert got == held if held is not None else isinstance(got, str)
