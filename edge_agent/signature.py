"""Whether a model file takes and answers what its Model's variant declares.

A variant may declare its inputs and outputs (docs/manifests.md), and callers write their
requests to that declaration. A new version whose file takes something else (another
name, datatype, rank or size) would load, serve, and answer every such request 400, half
a fleet's callers failing while its roll went on. So the agent refuses to load it: the
version before keeps serving, the model's state says which tensor differs and how, and
the control plane halts the roll as for a file that is no model at all. Where nothing is
declared nothing is checked.

Pure: the registry acts on the answer, and the data centre's ONNX application asks the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Tensor(Protocol):
    """A tensor as declared or as a loaded file describes it: a v2 datatype name, -1 any size."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...


def mismatch(declared_inputs: Sequence[Tensor], declared_outputs: Sequence[Tensor],
             inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> str | None:
    """Why a file of ``inputs`` and ``outputs`` does not fit what its variant declares
    (None: it fits, or nothing is declared).

    Each declared tensor must be in the file under its name, of its datatype and rank, and
    each dimension fixed in both the same size (a -1, or a file's symbolic dimension, fits
    any). When inputs are declared, the file must take no other (a caller would not send
    it); a file may answer outputs besides those declared."""
    problems = _compare("input", "takes", declared_inputs, inputs) if declared_inputs else []
    if declared_inputs:
        declared = {t.name for t in declared_inputs}
        undeclared = [repr(t.name) for t in inputs if t.name not in declared]
        if undeclared:
            problems.append(f"the file also takes input(s) {', '.join(undeclared)}, which the variant does not declare")
    if declared_outputs:
        problems += _compare("output", "answers", declared_outputs, outputs)
    if not problems:
        return None
    return "the model file does not match the variant's declared inputs and outputs: " + "; ".join(problems)


def _compare(kind: str, verb: str, declared: Sequence[Tensor], actual: Sequence[Tensor]) -> list[str]:
    have = {t.name: t for t in actual}
    problems = []
    for want in declared:
        got = have.get(want.name)
        if got is None:
            names = ", ".join(repr(t.name) for t in actual) or "none"
            problems.append(f"{kind} {want.name!r} is declared, but the file {verb} no {kind} of that name (it {verb}: {names})")
        elif got.datatype != want.datatype or not fits(want.shape, got.shape):
            problems.append(f"{kind} {want.name!r} is declared {want.datatype} {list(want.shape)}, "
                            f"but the file {verb} {got.datatype} {list(got.shape)}")
    return problems


def fits(declared: Sequence[int], actual: Sequence[int]) -> bool:
    """Whether shapes agree: the same rank, and each dimension the same where both are fixed."""
    return len(declared) == len(actual) and all(d < 0 or a < 0 or d == a for d, a in zip(declared, actual, strict=True))
