"""``ModelDeployment.spec.cascade``: answer with a cheap stage first, escalate when unsure.

A cascade lives on the deployment, not in a kind of its own, because its stages are the
variants that one deployment already places per tier (``spec.variant: {edge: distilled,
datacenter: full}``): residency, placement, rollouts and autoscaling stay the
deployment's, and the cascade only says in which order the gateway asks them and when a
stage's answer is not good enough. A separate kind would have to repeat or reference all
of that and could drift from it.

Each stage but the last says when to escalate (``escalate``):

- tensor models (Open Inference Protocol): ``confidence`` — the top class probability, or
  the margin between the two best, of a named output below a threshold; the output holds
  probabilities, or logits that are turned into probabilities with a softmax;
- generative models (OpenAI routes): ``meanLogprobBelow`` (mean token log-probability of
  the answer), ``truncated`` (the answer stopped at ``max_tokens``), ``refusal`` (regular
  expressions that mark a refusal);
- overload: ``maxInflight`` — the stage's best replica already has that many requests in
  flight. A stage that is down or fails always escalates: the cascade is also the fallback.

This module checks what one document can check; what needs the Model (stage variants
placed by the deployment, runtimes matching the rule, compatible inputs) is in
:mod:`orchestrator.manifests.references`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import pycountry
from pydantic import Field, StringConstraints, field_validator, model_validator

from orchestrator.manifests.strict import Strict

#: Runtimes whose stages answer through the OpenAI routes; ``ray-serve`` may be either.
GENERATIVE_RUNTIMES = frozenset({"onnx-genai", "vllm"})
TENSOR_RUNTIMES = frozenset({"onnx"})
#: One stage per tier: a stage's replicas are the deployment's on the tiers ``spec.variant``
#: gives its variant, and ``spec.variant`` names one variant per tier (edge, datacenter).
MAX_STAGES = 2

VariantName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
TensorName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
#: ``escalate.confidence.scores`` of a multi-label model: one probability per label, each
#: its own yes/no answer (a sigmoid's), or the logits before that sigmoid.
INDEPENDENT_SCORES = frozenset({"independent", "independent-logits"})


class Confidence(Strict):
    """A tensor stage is unsure when its confidence in ``output`` is below ``below``."""

    #: The output tensor holding one score per class, shape ``[batch, classes]`` (or ``[classes]``).
    output: TensorName
    #: ``probabilities`` (used as they are) or ``logits`` (a softmax is taken first), one
    #: class per row; ``independent`` (a multi-label model's: each score its label's own
    #: probability in 0..1) or ``independent-logits`` (a sigmoid is taken of each first).
    scores: Literal["probabilities", "logits", "independent", "independent-logits"] = "probabilities"
    #: ``top``: the best class's probability; ``margin``: best minus second best. For
    #: independent scores, of each label's yes and no: ``max(p, 1 - p)``, or ``|2p - 1|``.
    measure: Literal["top", "margin"] = "top"
    #: Escalate when the confidence is below this; in (0, 1].
    below: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _can_escalate(self) -> Confidence:
        if self.scores in INDEPENDENT_SCORES and self.measure == "top" and self.below <= 0.5:
            raise ValueError(f"scores: {self.scores} with measure: top reads each label as sure as max(p, 1 - p), never below "
                             f"0.5, so below: {self.below:g} would escalate nothing; give a threshold above 0.5 (0.9: every "
                             "label's probability at most 0.1 or at least 0.9), or measure: margin (|2p - 1|, 0 to 1)")
        return self


class Escalation(Strict):
    confidence: Confidence | None = None
    #: Generative: escalate when the answer's mean token log-probability is below this (< 0).
    meanLogprobBelow: float | None = Field(default=None, lt=0, ge=-100)
    #: Generative: escalate when the answer stopped at ``max_tokens`` (finish_reason ``length``).
    truncated: bool = False
    #: Generative: escalate when the answer matches any of these regular expressions.
    refusal: list[Annotated[str, StringConstraints(min_length=1, max_length=500)]] = Field(default_factory=list, max_length=50)
    #: Escalate without asking this stage when its best replica has this many requests in flight.
    maxInflight: int | None = Field(default=None, ge=1, le=100_000)

    @field_validator("refusal")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"refusal[{i}] {pattern!r} is not a regular expression: {exc}") from None
        return v

    @property
    def generative(self) -> bool:
        return self.meanLogprobBelow is not None or self.truncated or bool(self.refusal)

    @model_validator(mode="after")
    def _one_family(self) -> Escalation:
        if self.confidence is not None and self.generative:
            raise ValueError("'confidence' is for tensor models, 'meanLogprobBelow'/'truncated'/'refusal' for generative ones: "
                             "a stage serves one kind")
        if self.confidence is None and not self.generative and self.maxInflight is None:
            raise ValueError("say when to escalate: 'confidence' (tensor models), 'meanLogprobBelow', 'truncated' or "
                             "'refusal' (generative models), or 'maxInflight'")
        return self


class Stage(Strict):
    #: A variant this deployment places (``spec.variant`` per tier names where it runs).
    variant: VariantName
    #: When this stage's answer goes to the next stage; absent on the last stage only.
    escalate: Escalation | None = None


class Capture(Strict):
    """Keep a sample of this cascade's requests for distillation (``docs/distillation.md``).

    Absent: nothing is captured. A record (inputs, the last stage's output, the first
    stage's confidence, time, site, jurisdiction) goes to the store of the first zone in
    ``zones`` that holds the caller's jurisdiction; a request whose jurisdiction no zone
    holds is not captured."""

    #: Share of cascade requests kept, in (0, 1].
    sampleRate: float = Field(gt=0, le=1)
    #: At most this many records a day (UTC) per zone.
    dailyCap: int = Field(default=10_000, ge=1, le=10_000_000)
    #: Records are deleted this many days after they were captured.
    retentionDays: float = Field(default=30, gt=0, le=3650)
    #: Residency zones with a store (``EU`` or ISO country codes); one store each, never merged.
    zones: list[Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]] = Field(min_length=1, max_length=50)

    @field_validator("zones")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each zone once")
        for i, zone in enumerate(v):
            if zone != "EU" and pycountry.countries.get(alpha_2=zone) is None:
                raise ValueError(f"zones[{i}] {zone!r} is neither 'EU' nor an ISO 3166 alpha-2 country code")
        return v


class Cascade(Strict):
    stages: list[Stage] = Field(min_length=2)
    #: Opt-in capture of requests for distillation; absent = nothing is kept.
    capture: Capture | None = None

    @field_validator("stages")
    @classmethod
    def _one_per_tier(cls, v: list[Stage]) -> list[Stage]:
        if len(v) > MAX_STAGES:
            raise ValueError(f"a cascade has at most {MAX_STAGES} stages, one per tier: each stage is the variant "
                             f"spec.variant names for one tier (edge or datacenter); got {len(v)}")
        return v

    @model_validator(mode="after")
    def _stages(self) -> Cascade:
        names = [s.variant for s in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each stage is a different variant; repeated: {', '.join(repeated)}")
        for i, stage in enumerate(self.stages[:-1]):
            if stage.escalate is None:
                raise ValueError(f"stages[{i}] ({stage.variant}) needs 'escalate': when does it hand over to the next stage?")
        if self.stages[-1].escalate is not None:
            raise ValueError(f"the last stage ({self.stages[-1].variant}) answers everything it gets: it takes no 'escalate'")
        return self
