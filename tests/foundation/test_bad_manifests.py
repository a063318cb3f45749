"""Bad manifests, table-tested: each error names the right file, document, field and line.

Most cases run at the loader level (fast); each also runs again as the second file of a
bundle (the body the CLI sends), where file, document index and line must be the same as
for the file alone. A representative subset then goes through the real HTTP API and the
real CLI, where nothing may be applied: ``test_bad_manifests_served.py``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from orchestrator import catalog
from orchestrator.manifests import loader, references
from orchestrator.manifests.errors import ManifestIssue

from . import support
from .support import API_VERSION, join, line_of

DELETE = object()


def mutate(kind: str, name: str, spec: dict[str, Any], *changes: tuple[str, Any]) -> str:
    """A document with ``changes`` (dotted path -> new value, or DELETE) applied to the whole doc."""
    data = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": copy.deepcopy(spec)}
    for path, value in changes:
        parts: list[str | int] = []
        for piece in path.split("."):
            while "[" in piece:
                head, rest = piece.split("[", 1)
                if head:
                    parts.append(head)
                index, piece = rest.split("]", 1)
                parts.append(int(index))
            if piece:
                parts.append(piece)
        node: Any = data
        for part in parts[:-1]:
            node = node[part]
        if value is DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return yaml.safe_dump(data, sort_keys=False)


def site(*changes: tuple[str, Any], name: str = "s1") -> str:
    return mutate("Site", name, support.edge_site_spec(), *changes)


def dc(*changes: tuple[str, Any]) -> str:
    return mutate("Site", "dc1", support.dc_site_spec(), *changes)


def model(*changes: tuple[str, Any]) -> str:
    return mutate("Model", "m", support.model_spec(), *changes)


def deployment(*changes: tuple[str, Any]) -> str:
    return mutate("ModelDeployment", "d", support.deployment_spec(), *changes)


MODEL = model()


@dataclass(frozen=True)
class Bad:
    id: str
    text: str | bytes
    field: str
    line: Any  # a needle (its first line), (needle, nth), an int, or None for "no line"
    message: str  # expected in the message (case-insensitive)
    document: int | None = 0
    bundle: bool = True  # also check it as the second file of a bundle

    def expected_line(self) -> int | None:
        if self.line is None or isinstance(self.line, int):
            return self.line
        text = self.text.decode() if isinstance(self.text, bytes) else self.text
        if isinstance(self.line, tuple):
            return line_of(text, *self.line)
        return line_of(text, self.line)


H = f"apiVersion: {API_VERSION}\n"
GOOD_SITE = site()

ALIAS_BOMB = H + "kind: Site\nmetadata:\n  name: s1\nspec:\n  tier: edge\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6)
)
DEEP_ARGS = model(("spec.variants[0].runtime", "ray-serve"), ("spec.variants[0].artifact", DELETE),
                  ("spec.variants[0].importPath", "pkg.mod:app"), ("spec.variants[0].args", "DEEP"))
DEEP_ARGS = DEEP_ARGS.replace("args: DEEP", "args: " + "{a: " * 40 + "1" + "}" * 40)
ABSURD_NESTING = H + "kind: Site\nmetadata:\n  name: s1\nspec:\n  x: " + "[" * 5000 + "]" * 5000 + "\n"
JSON_DOC = json.dumps({"apiVersion": API_VERSION, "kind": "Site", "metadata": {"name": "s1"},
                       "spec": {**support.edge_site_spec(), "colour": "red"}}, indent=2)
MERGE_KEY = GOOD_SITE.replace("  location:\n", "  location:\n    <<: {lat: 1}\n")
DUP_KEY = GOOD_SITE.replace("    country: FR\n", "    country: FR\n    country: DE\n")
TWO_SITES = join(GOOD_SITE, site(name="s2"), site(("spec.location.lat", 12.5)))  # the third reuses s1
BAD_SECOND_DOC = join(GOOD_SITE, site(("spec.location.country", "ZZ"), name="s2"))
MISSING_MODEL = join(MODEL, deployment(("spec.model", "nope")))

BAD: list[Bad] = [
    # --- YAML itself -------------------------------------------------------------------
    Bad("yaml-bad-indentation", H + "kind: Site\nmetadata:\n  name: s1\n bad: indentation\nspec: {}\n", "", 5, "malformed YAML"),
    Bad("yaml-tab", GOOD_SITE.replace("  location:\n", "\tlocation: x\n  location:\n"), "", "\tlocation", "malformed YAML"),
    # JSON nested past what Python's json reads: its tabs are left to YAML, which says so
    Bad("json-tab-nested-too-deep", "[\t" + "[" * 5000 + "]" * 5000 + "\n", "", 1, "malformed YAML"),
    Bad("yaml-malformed-second-doc", join(GOOD_SITE, H + "kind: Site\nmetadata:\n  name: s2\n bad: indentation\n"), "",
        (" bad: indentation", 1), "malformed YAML", document=1),
    Bad("yaml-duplicate-key", DUP_KEY, "spec.location.country", "country: DE", "duplicate key 'country'"),
    Bad("yaml-duplicate-top-key", GOOD_SITE + "kind: Model\n", "kind", ("kind:", 2), "duplicate key 'kind'"),
    Bad("yaml-merge-key", MERGE_KEY, "spec.location", "<<:", "merge keys"),
    Bad("yaml-non-string-key", GOOD_SITE.replace("metadata:\n", "metadata:\n  labels: {1: x}\n"), "metadata.labels", "labels:",
        "keys must be strings"),
    Bad("yaml-python-tag", GOOD_SITE.replace("  tier: edge\n", "  tier: !!python/object:os.system x\n"), "spec.tier", "tier:",
        "cannot read value"),
    # an explicit tag on text it does not fit: PyYAML's constructor raises ValueError, KeyError...
    Bad("yaml-tag-that-does-not-fit", GOOD_SITE.replace("cpu: 8\n", "cpu: !!int '8{'\n"), "spec.capacity.cpu", "cpu:",
        "cannot read '8{' as int"),
    Bad("yaml-tagged-key-that-does-not-fit", GOOD_SITE.replace("metadata:\n", "metadata:\n  labels: {!!bool maybe: x}\n"),
        "metadata.labels", "labels:", "cannot read 'maybe' as bool"),
    # --- values JSON cannot hold: the object is stored as JSON and read back as JSON ---------
    # "\ud800" is half a UTF-16 pair, no character: stored, it failed every read of the object
    Bad("lone-surrogate-in-annotation", site(("metadata.annotations", {"owner": "x\ud800"})), "metadata.annotations.owner",
        "owner:", "lone surrogate (\\ud800)"),
    Bad("lone-surrogate-in-region", site(("spec.location.region", "\udfff")), "spec.location.region", "region:",
        "lone surrogate (\\udfff)"),
    Bad("lone-surrogate-in-a-key", model(("spec.variants[1].args", {"k\udc00": 1})), "spec.variants[1].args", "k\\uDC00",
        "the key holds a lone surrogate"),
    Bad("binary-in-args", model(("spec.variants[1].args", {"blob": b"\xff"})), "spec.variants[1].args.blob", "blob:",
        "binary data (!!binary)"),
    Bad("nan-in-args", model(("spec.variants[1].args", {"threshold": float("nan")})), "spec.variants[1].args.threshold",
        "threshold:", "finite number"),
    Bad("infinity-in-a-list-in-args", model(("spec.variants[1].args", {"steps": [1.0, float("-inf")]})),
        "spec.variants[1].args.steps[1]", "- -.inf", "finite number"),
    # the count passes 100k inside the 8th alias of e: the error names that alias in the text
    Bad("yaml-alias-bomb", ALIAS_BOMB, "spec.e[7]", "e: &e", "more than 100000 values"),
    Bad("yaml-deep-nesting", DEEP_ARGS, "spec.variants[0].args" + ".a" * 29, "args:", "nested deeper than 32 levels"),
    Bad("yaml-absurd-nesting", ABSURD_NESTING, "", "  x: [[[", "nested deeper than 32 levels"),
    Bad("not-utf8", GOOD_SITE.encode().replace(b"s1", b"s\xff1"), "", None, "not UTF-8", document=None, bundle=False),
    Bad("larger-than-4MiB", GOOD_SITE + "#" + "x" * (4 * 1024 * 1024) + "\n", "", None, "larger than 4 MiB", document=None, bundle=False),
    # the line of the document that passes the limit (in a bundle the limit is the apply's: see test_malformed_yaml_in_a_bundle)
    Bad("too-many-documents", "---\n".join([GOOD_SITE] * 1001), "", ("apiVersion:", 1001), "more than 1000 documents in one file",
        document=None, bundle=False),
    # --- document shape ----------------------------------------------------------------
    Bad("document-is-a-string", "just some text\n", "", 1, "must be a mapping"),
    Bad("second-document-is-a-number", join(GOOD_SITE, "42\n"), "", "42", "must be a mapping", document=1),
    Bad("wrong-apiVersion", GOOD_SITE.replace(API_VERSION, "edgeplane.io/v1"), "apiVersion", "apiVersion:", "apiVersion must be"),
    Bad("missing-apiVersion", GOOD_SITE.replace(f"apiVersion: {API_VERSION}\n", ""), "apiVersion", 1, "apiVersion must be"),
    Bad("unknown-kind", GOOD_SITE.replace("kind: Site", "kind: Sight"), "kind", "kind:", "unknown kind 'Sight'"),
    Bad("missing-kind", GOOD_SITE.replace("kind: Site\n", ""), "kind", 1, "kind is missing; expected one of Site, Model, ModelDeployment"),
    Bad("empty-kind", GOOD_SITE.replace("kind: Site\n", "kind:\n"), "kind", "kind:", "kind is empty; expected one of Site, Model"),
    Bad("missing-spec", H + "kind: Site\nmetadata:\n  name: s1\n", "spec", 1, "required field is missing"),
    Bad("missing-name", site(("metadata.name", DELETE)).replace("metadata: {}", "metadata:\n  labels: {a: b}"),
        "metadata.name", "metadata:", "required field is missing"),
    Bad("spec-is-a-list", H + "kind: Site\nmetadata:\n  name: s1\nspec:\n- tier: edge\n", "spec", "spec:",
        "Input should be a mapping with tier and location, not a list"),
    # an object left empty or given another type: its fields said, never the class behind them
    Bad("empty-spec", H + "kind: Site\nmetadata:\n  name: s1\nspec:\n", "spec", "spec:", "spec is empty; it needs tier and location"),
    Bad("empty-metadata", GOOD_SITE.replace("metadata:\n  name: s1\n", "metadata:\n"), "metadata", "metadata:",
        "metadata is empty; it needs name"),
    Bad("empty-list-item", model(("spec.variants[0]", None)), "spec.variants[0]", "- null", "variants[0] is empty; it needs name and runtime"),
    Bad("empty-object-with-defaults", join(MODEL, deployment(("spec.replicas", None))), "spec.replicas", "replicas:",
        "replicas is empty; give its fields (min, max) or leave it out", document=1),
    Bad("location-is-text", site(("spec.location", "Lyon")), "spec.location", "location:",
        "Input should be a mapping with country, lat and lon, not text"),
    Bad("empty-labels", site(("metadata.labels", None)), "metadata.labels", "labels:",
        "labels is empty; give key: value pairs or leave it out"),
    Bad("labels-is-a-list", site(("metadata.labels", ["zone"])), "metadata.labels", "labels:",
        "Input should be a mapping of key: value, not a list"),
    Bad("json-unknown-field", JSON_DOC, "spec.colour", '"colour"', "unknown field 'colour'"),
    # --- unknown fields at several depths ----------------------------------------------
    Bad("unknown-top-level-field", GOOD_SITE + "state: {}\n", "state", "state:", "unknown field 'state'"),
    Bad("error-in-a-get-list-item", yaml.safe_dump({"kind": "Site", "items": [yaml.safe_load(GOOD_SITE), yaml.safe_load(
        site(("spec.location.country", "XX"), name="s2"))]}, sort_keys=False), "spec.location.country", "country: XX", "XX", document=1),
    Bad("unknown-metadata-field", site(("metadata.namespace", "prod")), "metadata.namespace", "namespace:", "unknown field"),
    Bad("unknown-location-field", site(("spec.location.altitude", 300)), "spec.location.altitude", "altitude:", "unknown field"),
    Bad("unknown-variant-field", model(("spec.variants[1].quantization", "int8")), "spec.variants[1].quantization", "quantization:",
        "unknown field"),
    Bad("unknown-resources-field", model(("spec.variants[0].resources", {"cpu": 1, "tpus": 2})), "spec.variants[0].resources.tpus",
        "tpus:", "unknown field 'tpus'"),
    Bad("unknown-gpu-field", site(("spec.capacity.gpus", [{"model": "L4", "count": 1, "memoryGiB": 24, "vendor": "x"}])),
        "spec.capacity.gpus[0].vendor", "vendor:", "unknown field"),
    # a misspelt field: the closest field that object takes, as it is written
    Bad("misspelt-field", GOOD_SITE.replace("  tier: edge\n", "  teir: edge\n"), "spec.teir", "teir:",
        "unknown field 'teir' (did you mean 'tier'?)"),
    Bad("misspelt-top-level-field", GOOD_SITE.replace("spec:\n", "specs:\n"), "specs", "specs:",
        "unknown field 'specs' (did you mean 'spec'?)"),
    Bad("misspelt-field-of-a-list-item", MODEL.replace("runtime: onnx\n", "runtme: onnx\n"), "spec.variants[0].runtme", "runtme:",
        "unknown field 'runtme' (did you mean 'runtime'?)"),
    Bad("misspelt-field-of-an-optional-object", model(("spec.variants[0].resources", {"cpu": 1, "memoryMib": 2})),
        "spec.variants[0].resources.memoryMib", "memoryMib:", "unknown field 'memoryMib' (did you mean 'memoryMiB'?)"),
    Bad("misspelt-field-in-a-list-of-objects", site(("spec.capacity.gpus", [{"modle": "L4", "count": 1, "memoryGiB": 24}])),
        "spec.capacity.gpus[0].modle", "modle:", "unknown field 'modle' (did you mean 'model'?)"),
    Bad("misspelt-field-deep-in-a-cascade", join(MODEL, deployment(("spec.cascade", {"stages": [
        {"variant": "small", "escalate": {"confidance": {"output": "probs", "below": 0.5}}}, {"variant": "big"}]}))),
        "spec.cascade.stages[0].escalate.confidance", "confidance:", "unknown field 'confidance' (did you mean 'confidence'?)",
        document=1),
    # --- wrong types -------------------------------------------------------------------
    Bad("cpu-is-a-word", site(("spec.capacity.cpu", "eight")), "spec.capacity.cpu", "cpu:", "valid number"),
    Bad("replicas-is-a-string", join(MODEL, deployment(("spec.replicas.min", "2"))), "spec.replicas.min", "min:", "valid integer",
        document=1),
    Bad("gpu-count-is-a-bool", site(("spec.capacity.gpus", [{"model": "L4", "count": True, "memoryGiB": 24}])),
        "spec.capacity.gpus[0].count", "count:", "valid integer"),
    Bad("tier-is-a-number", site(("spec.tier", 3)), "spec.tier", "tier:", "'datacenter' or 'edge'"),
    Bad("label-value-is-a-number", site(("metadata.labels", {"zone": 5})), "metadata.labels.zone", "zone:",
        "5 was read as a number, not text: put it in quotes"),
    Bad("lon-is-a-string", site(("spec.location.lon", "4.8")), "spec.location.lon", "lon:", "valid number"),
    # Kubernetes quantities, numbers in quotes and YAML 1.1's exponents: what was written, and what to write
    Bad("cpu-as-a-kubernetes-quantity", model(("spec.variants[0].resources", {"cpu": "500m"})), "spec.variants[0].resources.cpu",
        "cpu:", "valid number, not '500m': cpu counts cores, so 500m is 0.5"),
    Bad("memory-as-a-kubernetes-quantity", model(("spec.variants[0].resources", {"memoryMiB": "16Gi"})),
        "spec.variants[0].resources.memoryMiB", "memoryMiB:", "valid integer, not '16Gi': memoryMiB is in MiB, so 16Gi is 16384"),
    Bad("memory-in-decimal-gigabytes", site(("spec.capacity.memoryGiB", "64G")), "spec.capacity.memoryGiB", "memoryGiB:",
        "valid number, not '64G': memoryGiB is in GiB, so 64G is 59.6046"),
    Bad("number-in-quotes", site(("spec.capacity.cpu", "8")), "spec.capacity.cpu", "cpu:",
        "valid number, not the text '8': write it without quotes"),
    Bad("exponent-yaml-reads-as-text", site(("spec.energy", {"carbonGramsPerKWh": 50, "powerBudgetWatts": "PBW"})).replace(
        "PBW", "5e3"), "spec.energy.powerBudgetWatts", "powerBudgetWatts:",
        "valid number, not the text '5e3': YAML reads an exponent without a '.' and a sign as text: write 5000 or 5.0e+3"),
    Bad("whole-number-as-a-float", model(("spec.variants[0].resources", {"memoryMiB": 2.0e+3})),
        "spec.variants[0].resources.memoryMiB", "memoryMiB:", "valid integer, not 2000.0: write it as digits, 2000"),
    Bad("variant-name-or-map", join(MODEL, deployment(("spec.variant", ["small"]))), "spec.variant", "variant:", "valid string",
        document=1),
    # --- codes ---------------------------------------------------------------------------
    Bad("bad-country", site(("spec.location.country", "XX")), "spec.location.country", "country:", "ISO 3166"),
    Bad("lowercase-country", site(("spec.location.country", "fr")), "spec.location.country", "country:", "ISO 3166"),
    Bad("bad-residency", join(MODEL, deployment(("spec.placement.residency", ["FR", "EUR"]))), "spec.placement.residency[1]",
        "- EUR", "'EUR' is not an ISO 3166", document=1),
    Bad("lowercase-residency-group", join(MODEL, deployment(("spec.placement.residency", ["eu"]))), "spec.placement.residency[0]",
        "- eu", "ISO 3166", document=1),
    Bad("bad-tier-in-list", join(MODEL, deployment(("spec.placement.tiers", ["edge", "cloud"]))), "spec.placement.tiers[1]",
        "- cloud", "'datacenter' or 'edge'", document=1),
    Bad("empty-tiers", join(MODEL, deployment(("spec.placement.tiers", []))), "spec.placement.tiers", "tiers:", "at least 1",
        document=1),
    Bad("tier-listed-twice", join(MODEL, deployment(("spec.placement.tiers", ["edge", "datacenter", "edge"]))), "spec.placement.tiers",
        "tiers:", "edge is listed more than once: give each tier once", document=1),
    Bad("residency-listed-twice", join(MODEL, deployment(("spec.placement.residency", ["EU", "FR", "FR"]))),
        "spec.placement.residency", "residency:", "FR is listed more than once: give each code once", document=1),
    Bad("bad-spread", join(MODEL, deployment(("spec.placement.spread", {"by": "rack"}))), "spec.placement.spread.by", "by:",
        "'region' or 'site'", document=1),
    # --- names ---------------------------------------------------------------------------
    Bad("uppercase-name", site(name="Edge-Lyon"), "metadata.name", "name:", "lowercase letters"),
    Bad("name-too-long", site(name="a" * 64), "metadata.name", "name:", "at most 63 characters"),
    Bad("bad-label-key", site(("metadata.labels", {"-zone": "x"})), "metadata.labels.-zone", "-zone:", "alphanumeric at both ends"),
    Bad("duplicate-names-in-file", TWO_SITES, "metadata.name", ("name: s1", 2), "Site 's1' is defined twice (also document 0)",
        document=2),
    Bad("duplicate-variant-names", model(("spec.variants[1].name", "small")), "spec.variants", "variants:", "repeated: small"),
    # --- impossible numbers --------------------------------------------------------------
    Bad("min-greater-than-max", join(MODEL, deployment(("spec.replicas", {"min": 5, "max": 2}))), "spec.replicas", "replicas:",
        "min (5) is greater than max (2)", document=1),
    Bad("negative-min", join(MODEL, deployment(("spec.replicas.min", -1))), "spec.replicas.min", "min:", "greater than or equal to 0",
        document=1),
    Bad("zero-max", join(MODEL, deployment(("spec.replicas", {"min": 0, "max": 0}))), "spec.replicas.max", "max:",
        "greater than or equal to 1", document=1),
    Bad("zero-cpu", site(("spec.capacity.cpu", 0)), "spec.capacity.cpu", "cpu:", "greater than 0"),
    Bad("vanishing-throughput", model(("spec.variants[0].throughputRps", 1.0e-320)), "spec.variants[0].throughputRps",
        "throughputRps:", "greater than or equal to 0.001"),
    Bad("nan-lat", site(("spec.location.lat", float("nan"))), "spec.location.lat", "lat:", "finite number"),
    Bad("infinite-rps", join(MODEL, deployment(("spec.demand", [{"region": "eu-west", "rps": float("inf")}]))), "spec.demand[0].rps",
        "rps:", "finite number", document=1),
    Bad("lat-out-of-range", site(("spec.location.lat", 91)), "spec.location.lat", "lat:", "less than or equal to 90"),
    Bad("pue-below-one", site(("spec.energy.pue", 0.5)), "spec.energy.pue", "pue:", "greater than or equal to 1"),
    Bad("zero-power-budget", site(("spec.energy", {"carbonGramsPerKWh": 50, "powerBudgetWatts": 0})), "spec.energy.powerBudgetWatts",
        "powerBudgetWatts:", "greater than 0"),
    Bad("power-budget-not-a-number", site(("spec.energy", {"carbonGramsPerKWh": 50, "powerBudgetWatts": "150W"})),
        "spec.energy.powerBudgetWatts", "powerBudgetWatts:", "valid number"),
    # 300 g/kWh is assumed for a site without `energy`; one that gives `energy` gives its carbon figure
    Bad("energy-without-carbon", site(("spec.energy", {"pue": 1.2})), "spec.energy.carbonGramsPerKWh", "energy:",
        "required field is missing"),
    Bad("negative-rps", join(MODEL, deployment(("spec.demand", [{"region": "eu-west", "rps": -5}]))), "spec.demand[0].rps", "rps:",
        "greater than or equal to 0", document=1),
    Bad("negative-max-unavailable", join(MODEL, deployment(("spec.rollout", {"maxUnavailable": -1}))), "spec.rollout.maxUnavailable",
        "maxUnavailable:", "greater than or equal to 0", document=1),
    Bad("max-unavailable-over-100-percent", join(MODEL, deployment(("spec.rollout", {"maxUnavailable": "150%"}))),
        "spec.rollout.maxUnavailable", "maxUnavailable:", "0% to 100%", document=1),
    Bad("zero-canary-step", join(MODEL, deployment(("spec.rollout", {"canarySteps": [10, 0]}))), "spec.rollout.canarySteps[1]",
        "- 0", "greater than or equal to 1", document=1),
    Bad("zero-target-inflight", join(MODEL, deployment(("spec.autoscaling", {"targetInflight": 0}))),
        "spec.autoscaling.targetInflight", "targetInflight:", "greater than or equal to 1", document=1),
    Bad("gpu-memory-without-gpus", model(("spec.variants[0].resources", {"gpuMemoryGiB": 16})), "spec.variants[0].resources",
        "resources:", "gpuMemoryGiB is set but gpus is 0"),
    # --- one-of rules --------------------------------------------------------------------
    Bad("datacenter-without-runtime", dc(("spec.ray", DELETE)), "spec", "spec:", "exactly one of 'ray' or 'kubernetes'"),
    Bad("datacenter-with-both", dc(("spec.kubernetes", {"context": "prod"})), "spec", "spec:", "exactly one of 'ray' or 'kubernetes'"),
    Bad("datacenter-without-capacity", dc(("spec.capacity", DELETE)), "spec", "spec:", "needs 'capacity'"),
    Bad("edge-with-ray", site(("spec.ray", {"address": "local"})), "spec", "spec:", "'ray' and 'kubernetes' are for datacenter"),
    Bad("bad-ray-address", dc(("spec.ray.address", "ray-head:8265")), "spec.ray.address", "address:", "dashboard URL"),
    Bad("ray-address-trailing-newline", dc(("spec.ray.address", "http://ray-head:8265\n")), "spec.ray.address", "address:",
        "dashboard URL"),
    Bad("demand-region-and-lat", join(MODEL, deployment(("spec.demand", [{"region": "eu-west", "lat": 1.0, "lon": 2.0, "rps": 1}]))),
        "spec.demand[0]", "- region:", "either 'region' or 'lat'/'lon'", document=1),
    Bad("demand-lat-without-lon", join(MODEL, deployment(("spec.demand", [{"lat": 1.0, "rps": 1}]))), "spec.demand[0]", "- lat:",
        "both lat and lon", document=1),
    Bad("autoscaling-both-targets", join(MODEL, deployment(("spec.autoscaling", {"targetInflight": 4, "targetRps": 10}))),
        "spec.autoscaling", "autoscaling:", "exactly one of targetInflight or targetRps", document=1),
    Bad("autoscaling-no-target", join(MODEL, deployment(("spec.autoscaling", {}))), "spec.autoscaling", "autoscaling:",
        "exactly one of", document=1),
    Bad("onnx-without-artifact", model(("spec.variants[0].artifact", DELETE)), "spec.variants[0]", "- name: small",
        "needs 'artifact'"),
    Bad("ray-serve-with-artifact", model(("spec.variants[1].artifact", {"uri": "a.onnx", "sha256": "0" * 64})), "spec.variants[1]",
        "- name: big", "'artifact' is for onnx"),
    Bad("no-variants", model(("spec.variants", [])), "spec.variants", "variants:", "at least 1"),
    # --- artifacts -----------------------------------------------------------------------
    Bad("sha256-uppercase", model(("spec.variants[0].artifact.sha256", "A" * 64)), "spec.variants[0].artifact.sha256", "sha256:",
        "64 lowercase hexadecimal"),
    Bad("sha256-short", model(("spec.variants[0].artifact.sha256", "abc123")), "spec.variants[0].artifact.sha256", "sha256:",
        "64 lowercase hexadecimal"),
    Bad("uri-dot-dot", model(("spec.variants[0].artifact.uri", "artifacts/../../etc/passwd")), "spec.variants[0].artifact.uri",
        "uri:", "--artifact-root"),
    Bad("uri-leading-dot-dot", model(("spec.variants[0].artifact.uri", "../secret.onnx")), "spec.variants[0].artifact.uri", "uri:",
        "--artifact-root"),
    Bad("uri-absolute-path", model(("spec.variants[0].artifact.uri", "/etc/passwd")), "spec.variants[0].artifact.uri", "uri:",
        "--artifact-root"),
    Bad("uri-trailing-newline", model(("spec.variants[0].artifact.uri", "m.onnx\n")), "spec.variants[0].artifact.uri", "uri:",
        "--artifact-root"),
    Bad("uri-ftp", model(("spec.variants[0].artifact.uri", "ftp://host/m.onnx")), "spec.variants[0].artifact.uri", "uri:",
        "http://, https:// or file://"),
    Bad("uri-nul-in-file-path", model(("spec.variants[0].artifact.uri", "file:///srv/models/a%00b.onnx")),
        "spec.variants[0].artifact.uri", "uri:", "must not contain a NUL byte"),
    Bad("uri-unparsable-host", model(("spec.variants[0].artifact.uri", "http://[::1/m.onnx")), "spec.variants[0].artifact.uri",
        "uri:", "Invalid IPv6 URL"),
    Bad("uri-port-not-a-number", model(("spec.variants[0].artifact.uri", "https://models.example.com:https/m.onnx")),
        "spec.variants[0].artifact.uri", "uri:", "not a valid URL"),
    Bad("uri-without-host", model(("spec.variants[0].artifact.uri", "https:///m.onnx")), "spec.variants[0].artifact.uri", "uri:",
        "must name a host"),
    Bad("bad-import-path", model(("spec.variants[1].importPath", "pkg.mod:app()")), "spec.variants[1].importPath", "importPath:",
        "package.module:attribute"),
    Bad("import-path-without-module", model(("spec.variants[1].importPath", "pkgapp")), "spec.variants[1].importPath", "importPath:",
        "'pkgapp' is not an import path Ray Serve takes"),
    # --- references between documents ----------------------------------------------------
    Bad("missing-model", MISSING_MODEL, "spec.model", "model: nope", "Model 'nope' does not exist", document=1),
    Bad("missing-variant", join(MODEL, deployment(("spec.variant", "medium"))), "spec.variant", "variant: medium",
        "has no variant 'medium'", document=1),
    Bad("missing-variant-per-tier", join(MODEL, deployment(("spec.variant", {"edge": "tiny"}))), "spec.variant.edge", "edge: tiny",
        "has no variant 'tiny'", document=1),
    Bad("ray-serve-at-the-edge", join(MODEL, deployment(("spec.variant", "big"), ("spec.placement.tiers", ["edge"]))), "spec.variant",
        "variant: big", "runs only in data centres", document=1),
    Bad("ray-serve-per-tier-edge", join(MODEL, deployment(("spec.variant", {"edge": "big"}))), "spec.variant.edge", "edge: big",
        "only onnx and onnx-genai variants run at the edge", document=1),
    Bad("variant-tier-not-placed", join(MODEL, deployment(("spec.variant", {"datacenter": "big"}), ("spec.placement.tiers", ["edge"]))),
        "spec.variant.datacenter", "datacenter: big", "not in spec.placement.tiers", document=1),
    Bad("fallback-tier-not-placed", join(MODEL, deployment(("spec.placement.tiers", ["edge"]), ("spec.routing", {"fallback": ["datacenter"]}))),
        "spec.routing.fallback[0]", "- datacenter", "not in spec.placement.tiers", document=1),
    Bad("error-in-second-document", BAD_SECOND_DOC, "spec.location.country", "country: ZZ", "ISO 3166", document=1),
]


def check(text: str | bytes, file: str = "bad.yaml") -> list[ManifestIssue]:
    """What the catalog checks for an empty store: every document, and the references of the valid ones."""
    return catalog.check(loader.read_text(text, file), {})


def assert_names(issues: list[ManifestIssue], case: Bad, file: str) -> None:
    assert issues, f"{case.id}: accepted, expected an error"
    matching = [i for i in issues if i.field == case.field]
    assert matching, f"{case.id}: no issue names field {case.field!r}: {[str(i) for i in issues]}"
    issue = matching[0]
    assert issue.file == file, str(issue)
    assert issue.document == case.document, str(issue)
    assert issue.line == case.expected_line(), str(issue)
    assert case.message.lower() in issue.message.lower(), str(issue)


def test_the_table_is_big_enough() -> None:
    assert len(BAD) >= 40
    assert len({c.id for c in BAD}) == len(BAD)


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_manifest_names_file_document_field_and_line(case: Bad) -> None:
    issues = check(case.text)
    assert_names(issues, case, "bad.yaml")
    # the words of the text, not of the code that reads it (a class name, a Python dictionary)
    assert not [str(i) for i in issues if "instance of" in i.message or "dictionary" in i.message]


@pytest.mark.parametrize("case", [c for c in BAD if c.bundle], ids=[c.id for c in BAD if c.bundle])
def test_bad_manifest_in_a_bundle_names_its_own_file(case: Bad) -> None:
    """As the CLI sends a directory: the error keeps the file's own name, index and line."""
    good = support.doc("Site", "good-site", support.edge_site_spec(), labels={"zone": "a"})
    body = loader.bundle([("dir/good.yaml", join(good, good.replace("good-site", "good-site-2"))), ("dir/bad.yaml", case.text)])  # type: ignore[list-item]
    assert_names(check(body, "<request>"), case, "dir/bad.yaml")


def test_several_errors_are_all_reported() -> None:
    text = join(site(("spec.location.country", "XX")), site(("spec.capacity.cpu", -1), name="s2"), "kind: Nope\n")
    issues = check(text)
    assert [(i.document, i.field) for i in issues] == [
        (0, "spec.location.country"), (1, "spec.capacity.cpu"), (2, "apiVersion")]


def test_errors_in_several_files_of_a_bundle_name_each_file() -> None:
    body = loader.bundle([("a.yaml", site(("spec.location.country", "XX"))),
                          ("b.yaml", join(GOOD_SITE.replace("s1", "s2"), site(("spec.location.lat", 100), name="s3")))])
    issues = check(body)
    got = [(i.file, i.document, i.field, i.line) for i in issues]
    second_doc_offset = len(GOOD_SITE.splitlines()) + 1  # the first document and its '---'
    assert got == [("a.yaml", 0, "spec.location.country", line_of(site(), "country:")),
                   ("b.yaml", 1, "spec.location.lat", second_doc_offset + line_of(site(), "lat:"))]


def test_duplicate_names_across_files_name_both_files() -> None:
    body = loader.bundle([("a.yaml", GOOD_SITE), ("b.yaml", join(site(name="s2"), GOOD_SITE))])
    issues = check(body)
    assert len(issues) == 1
    issue = issues[0]
    assert (issue.file, issue.document, issue.field) == ("b.yaml", 1, "metadata.name")
    assert issue.line == len(site(name="s2").splitlines()) + 1 + line_of(GOOD_SITE, "name: s1")
    assert "a.yaml document 0" in issue.message


@pytest.mark.parametrize(("text", "said"), [
    # the field it may mean is not also said to be missing
    (GOOD_SITE.replace("  tier: edge\n", "  teir: edge\n"), ["spec.teir: unknown field 'teir' (did you mean 'tier'?)"]),
    # a field already given is no suggestion; nor is a field of another object
    (site(("spec.location.latt", 1.0)), ["spec.location.latt: unknown field 'latt'"]),
    (site(("spec.colour", "red")), ["spec.colour: unknown field 'colour'"]),
    (site(("spec.capacity.regoin", "x")), ["spec.capacity.regoin: unknown field 'regoin'"]),
], ids=["missing-field-not-said-twice", "given-field", "nothing-close", "another-objects-field"])
def test_unknown_field_suggests_only_a_close_field_of_its_object(text: str, said: list[str]) -> None:
    assert [f"{i.field}: {i.message}" for i in check(text)] == said


def test_issue_prints_as_file_line_document_field() -> None:
    issue = check(site(("spec.location.country", "XX")))[0]
    assert str(issue).startswith(f"bad.yaml:{line_of(site(), 'country:')} (document 0): spec.location.country: ")


# --- good manifests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Good:
    id: str
    text: str
    expected: list[tuple[str, str, int, int]]  # kind, name, document index, line


KUBE_DC = dc(("spec.ray", DELETE), ("spec.kubernetes", {"context": "prod-eu", "namespace": "serving"}))
GOOD: list[Good] = [
    Good("one-site", GOOD_SITE, [("Site", "s1", 0, 1)]),
    Good("leading-separator-and-comments", "# fleet\n---\n" + GOOD_SITE, [("Site", "s1", 0, 3)]),
    Good("empty-documents-are-not-counted", "---\n---\n" + GOOD_SITE + "---\n# nothing\n---\n" + site(name="s2"),
         [("Site", "s1", 0, 3), ("Site", "s2", 1, 2 + len(GOOD_SITE.splitlines()) + 4)]),
    Good("document-end-markers", GOOD_SITE + "...\n---\n" + site(name="s2"),
         [("Site", "s1", 0, 1), ("Site", "s2", 1, len(GOOD_SITE.splitlines()) + 3)]),
    Good("model-and-deployment-together", join(MODEL, deployment()),
         [("Model", "m", 0, 1), ("ModelDeployment", "d", 1, len(MODEL.splitlines()) + 2)]),
    Good("kubernetes-datacenter", KUBE_DC, [("Site", "dc1", 0, 1)]),
    Good("json-document", json.dumps({"apiVersion": API_VERSION, "kind": "Site", "metadata": {"name": "s1"},
                                      "spec": support.edge_site_spec()}), [("Site", "s1", 0, 1)]),
    Good("json-list-of-documents", json.dumps([yaml.safe_load(GOOD_SITE), yaml.safe_load(site(name="s2"))], indent=1),
         [("Site", "s1", 0, 2), ("Site", "s2", 1, 2 + len(json.dumps(yaml.safe_load(GOOD_SITE), indent=1).splitlines()))]),
    # what jq --tab, Go's json.MarshalIndent(v, "", "\t") and many editors write: tabs between
    # tokens, which PyYAML's scanner refuses but JSON allows (a JSON string holds none)
    Good("json-indented-with-tabs", json.dumps([yaml.safe_load(GOOD_SITE), yaml.safe_load(site(name="s2"))], indent="\t"),
         [("Site", "s1", 0, 2), ("Site", "s2", 1, 2 + len(json.dumps(yaml.safe_load(GOOD_SITE), indent="\t").splitlines()))]),
    # what `get -o yaml|json` prints: status and server-set metadata are ignored, a list is its items
    Good("get-output-with-status-and-server-metadata", GOOD_SITE.replace("metadata:\n", "metadata:\n  generation: 3\n"
         "  creationTimestamp: '2026-12-04T17:39:23Z'\n  resourceVersion: '12'\n") + "status: {health: Healthy, anything: [1, 2]}\n",
         [("Site", "s1", 0, 1)]),
    Good("get-list-output", yaml.safe_dump({"kind": "Site", "items": [yaml.safe_load(GOOD_SITE), yaml.safe_load(site(name="s2"))]},
                                           sort_keys=False),
         [("Site", "s1", 0, 3), ("Site", "s2", 1, 3 + len(yaml.safe_dump(yaml.safe_load(GOOD_SITE), sort_keys=False).splitlines()))]),
    Good("same-name-different-kinds", join(MODEL, mutate("Site", "m", support.edge_site_spec())),
         [("Model", "m", 0, 1), ("Site", "m", 1, len(MODEL.splitlines()) + 2)]),
    Good("everything-optional", join(MODEL, deployment(
        ("spec.variant", {"edge": "small", "datacenter": "big"}),
        ("spec.placement", {"residency": ["EU", "CH"], "tiers": ["edge", "datacenter"], "siteSelector": {"example.com/zone": "eu-west"},
                            "spread": {"by": "region", "maxSkew": 2}}),
        ("spec.demand", [{"region": "eu-west", "rps": 10}, {"lat": 48.8, "lon": 2.3, "rps": 0}]),
        ("spec.routing", {"fallback": ["edge", "datacenter"]}),
        ("spec.rollout", {"maxUnavailable": "25%", "canarySteps": [10, 50, 100]}),
        ("spec.autoscaling", {"targetRps": 50.5}),
    )), [("Model", "m", 0, 1), ("ModelDeployment", "d", 1, len(MODEL.splitlines()) + 2)]),
    Good("site-power-budget", site(("spec.energy", {"carbonGramsPerKWh": 50, "pue": 1.4, "powerBudgetWatts": 1500})),
         [("Site", "s1", 0, 1)]),
    Good("unicode-description", model(("spec.description", "Modèle d'intention — ☃")), [("Model", "m", 0, 1)]),
    Good("gpus-with-memory", model(("spec.variants[1].resources", {"gpus": 1, "gpuMemoryGiB": 80})), [("Model", "m", 0, 1)]),
    Good("residency-of-a-group-and-a-member", join(MODEL, deployment(("spec.placement.residency", ["EU", "FR"]))),
         [("Model", "m", 0, 1), ("ModelDeployment", "d", 1, len(MODEL.splitlines()) + 2)]),
]


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_good_manifest_loads_with_positions(case: Good) -> None:
    docs = loader.load_text(case.text, "good.yaml")
    assert [(d.kind, d.name, d.index, d.line) for d in docs] == case.expected
    assert all(d.file == "good.yaml" for d in docs)
    assert references.check_references(docs, {}) == []


def test_deployment_may_name_a_model_already_stored() -> None:
    stored = {d.name: d.doc.spec for d in loader.load_text(MODEL)}  # type: ignore[misc]
    docs = loader.load_text(deployment())
    assert references.check_references(docs, stored) == []
    assert references.check_references(docs, {})[0].field == "spec.model"


@pytest.mark.parametrize(("prefix", "newline"), [("\ufeff", "\n"), ("", "\r\n"), ("\ufeff", "\r\n")], ids=["bom", "crlf", "bom-crlf"])
def test_bundled_files_with_a_bom_or_crlf_keep_their_positions(prefix: str, newline: str) -> None:
    """Files saved by Windows editors: a byte-order mark and CRLF line ends."""
    first = site(name="s2")
    text = prefix + join(first, site(("spec.location.country", "XX"), name="s3")).replace("\n", newline)
    issues = check(loader.bundle([("a.yaml", GOOD_SITE), ("b.yaml", text)]))
    assert [(i.file, i.document, i.field, i.line) for i in issues] == [
        ("b.yaml", 1, "spec.location.country", len(first.splitlines()) + 1 + line_of(site(), "country:"))]
    docs = loader.load_text(loader.bundle([("a.yaml", GOOD_SITE), ("b.yaml", prefix + first.replace("\n", newline))]))
    assert [(d.file, d.index, d.line, d.name) for d in docs] == [("a.yaml", 0, 1, "s1"), ("b.yaml", 0, 1, "s2")]


@pytest.mark.parametrize(("replicas", "expected"), [
    ({"min": 3}, (3, 3)),  # a fixed count: max follows min
    ({}, (1, 1)),
    ({"min": 0}, (0, 1)),  # scale to zero, one replica when called
    ({"min": 2, "max": 5}, (2, 5)),
    ({"max": 4}, (1, 4)),
])
def test_replicas_max_defaults_to_min(replicas: dict[str, int], expected: tuple[int, int]) -> None:
    from orchestrator.manifests import schema

    parsed = schema.Replicas.model_validate(replicas)
    assert (parsed.min, parsed.max) == expected
