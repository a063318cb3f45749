"""The real KubeRay ``RayService`` CRD's schema, for rendered objects to validate against."""

from __future__ import annotations

import pathlib
from typing import Any

import jsonschema
import pytest
import yaml

#: The real KubeRay CRD, from the shared folder beside the repository's clone.
CRD = pathlib.Path(__file__).resolve().parents[3] / "shared" / "crds" / "ray.io_rayservices.yaml"


def _strip_extensions(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _strip_extensions(v) for k, v in node.items() if not k.startswith("x-kubernetes-")
        }
    if isinstance(node, list):
        return [_strip_extensions(v) for v in node]
    return node


@pytest.fixture(scope="module")
def rayservice_validator(rayservice_schema: dict[str, Any]) -> Any:
    """A validator built once: ``jsonschema.validate`` checks the CRD's large schema itself on
    every call, which is most of its time."""
    return jsonschema.validators.validator_for(rayservice_schema)(rayservice_schema)


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    if not CRD.exists():
        pytest.skip(f"{CRD} is not present")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strip_extensions(v1["schema"]["openAPIV3Schema"])
