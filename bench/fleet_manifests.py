"""Write a generated benchmark fleet as manifests, so the CLI can be timed on it.

    .venv/bin/python -m bench.fleet_manifests DIR [--sites N]

The fleet and deployments are those of ``bench.scheduler_instances`` (seeded by the site
count, as in ``bench.scheduler_scale``), written as Site, Model and ModelDeployment documents
that ``edgeplane simulate -f DIR`` (or ``apply``) reads. Artifacts are placeholders: the
simulation never downloads them.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import yaml

from bench.scheduler_instances import make_deployments, make_fleet
from orchestrator.manifests import schema
from orchestrator.scheduler import model as sched

PLACEHOLDER_SHA = "0" * 64
PER_FILE = 500


def site_doc(s: sched.Site) -> dict:
    capacity: dict = {"cpu": s.cpu, "memoryGiB": s.memory_gib}
    if s.gpus:
        capacity["gpus"] = [{"model": g.model, "count": g.count, "memoryGiB": g.memory_gib} for g in s.gpus]
    spec = {"tier": str(s.tier), "location": {"country": s.country, "region": s.region, "lat": round(s.lat, 4), "lon": round(s.lon, 4)},
            "capacity": capacity, "energy": {"carbonGramsPerKWh": round(s.carbon_g_per_kwh, 1), "pue": round(s.pue, 3)}}
    if s.tier is sched.Tier.DATACENTER:
        spec["ray"] = {"address": "local"}
    return {"apiVersion": schema.API_VERSION, "kind": "Site", "metadata": {"name": s.name, "labels": dict(s.labels)}, "spec": spec}


def variant_doc(v: sched.Variant) -> dict:
    resources: dict = {"cpu": v.cpu, "memoryMiB": int(v.memory_mib)}
    if v.gpus:
        resources.update(gpus=v.gpus, gpuMemoryGiB=v.gpu_memory_gib)
    out: dict = {"name": v.name, "runtime": str(v.runtime), "resources": resources}
    if v.throughput_rps:
        out["throughputRps"] = v.throughput_rps
    if v.runtime is sched.Runtime.ONNX:
        out["artifact"] = {"uri": f"https://models.example/{v.name}.onnx", "sha256": PLACEHOLDER_SHA}
    else:
        out["importPath"] = "models.llm:app"
    return out


def deployment_docs(d: sched.Deployment) -> list[dict]:
    model = {"apiVersion": schema.API_VERSION, "kind": "Model", "metadata": {"name": d.model},
             "spec": {"variants": [variant_doc(v) for v in d.variants]}}
    p = d.placement
    placement: dict = {"tiers": sorted(str(t) for t in p.tiers)}
    if p.residency is not None:
        placement["residency"] = sorted(p.residency)
    if p.site_selector:
        placement["siteSelector"] = dict(p.site_selector)
    if p.spread is not None:
        placement["spread"] = {"by": p.spread.by, "maxSkew": p.spread.max_skew}
    spec: dict = {"model": d.model, "replicas": {"min": d.min_replicas, "max": d.max_replicas}, "placement": placement,
                  "demand": [{"region": x.region, "rps": x.rps} for x in d.demand]}
    if d.variant_by_tier:
        spec["variant"] = {str(t): v for t, v in d.variant_by_tier.items()}
    deployment = {"apiVersion": schema.API_VERSION, "kind": "ModelDeployment", "metadata": {"name": d.name}, "spec": spec}
    return [model, deployment]


def write(dest: pathlib.Path, n_sites: int) -> tuple[list[sched.Site], list[sched.Deployment]]:
    rng = np.random.default_rng(n_sites)
    sites = make_fleet(rng, n_sites)
    deployments = make_deployments(rng, sites, n_sites // 10, replicas_per=20)
    dest.mkdir(parents=True, exist_ok=True)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    docs = [site_doc(s) for s in sites] + [doc for d in deployments for doc in deployment_docs(d)]
    for n in range(0, len(docs), PER_FILE):  # the loader takes at most 1,000 documents per file
        (dest / f"fleet-{n // PER_FILE:03d}.yaml").write_text(yaml.dump_all(docs[n:n + PER_FILE], Dumper=dumper, sort_keys=False))
    return sites, deployments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest", type=pathlib.Path)
    p.add_argument("--sites", type=int, default=10_000)
    args = p.parse_args()
    sites, deployments = write(args.dest, args.sites)
    print(f"wrote {len(sites)} sites and {len(deployments)} deployments to {args.dest}")


if __name__ == "__main__":
    main()
