"""The rules every manifest model is read under, and whether a value comes from a manifest.

Apart from :mod:`orchestrator.manifests.schema` so that the modules it is built from
(:mod:`~orchestrator.manifests.cascade`, :mod:`~orchestrator.manifests.llm`) read under the
same rules without importing it back.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationInfo


def written(info: ValidationInfo) -> bool:
    """Whether the value being validated comes from a manifest, not from the store."""
    return bool((info.context or {}).get("manifest"))


class Strict(BaseModel):
    # NaN and infinity pass or fail range checks confusingly (NaN > 0 is False): refuse them outright
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
